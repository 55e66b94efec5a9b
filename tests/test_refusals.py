"""What fit and attribute refuse, by fault injection: each case gives the right C or a
clear error naming the cause (issue 28).

* Ctrl-C (a KeyboardInterrupt, which skorch catches) in the middle of a batch: only the
  optimizer steps actually applied are recorded, the fit warns and sets
  ``interrupted_``, and exact C equals finite differences of replaying those steps.
  Once in-process (a callback raises), once with a real SIGINT in a subprocess.
* Divergence (a learning rate that sends the loss to infinity), NLLLoss on logits.
* Updates that differ from the recorded ones: gradient clipping, a callback that edits
  the weights between steps, a train step that adds a penalty outside ``get_loss``.
* ``storage="memmap"`` on a full disk (``os.posix_fallocate`` monkeypatched to fail)
  and a ``store_dir`` that is a file or not writable: an ``OSError`` naming
  ``store_dir``, raised before training.
* Targets the criterion cannot take, and bad parameters.
"""
import errno
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier, NeuralNetRegressor
from skorch.callbacks import Callback, EarlyStopping, GradientNormClipping

from hydrattr import HydraAttributor
from hydrattr._core.replay import replay_training
from hydrattr._skorch import flat_params, module_mode
from hydrattr.models import MLP

from _blobs import three_blobs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N, N_TEST = 60, 5  # batches of 20: 3 steps per epoch


def _net(**kw):
    params = dict(module=MLP, module__n_features=4, module__n_classes=3, module__hidden=(8,),
                  module__activation="tanh", module__dtype=torch.float64,
                  criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.1,
                  optimizer__momentum=0.9, batch_size=20, max_epochs=3, train_split=None,
                  verbose=0, iterator_train__shuffle=True)
    params.update(kw)
    return NeuralNetClassifier(**params)


class InterruptAt(Callback):
    """Raise KeyboardInterrupt (or send SIGINT) once the ``at``-th batch gradient exists:
    inside ``optimizer.step``'s closure, before the update is applied."""

    def __init__(self, at, sigint=False):
        self.at = at
        self.sigint = sigint

    def initialize(self):
        self.n_ = 0
        return self

    def on_grad_computed(self, net, named_parameters, **kwargs):
        self.n_ += 1
        if self.n_ == self.at:
            if self.sigint:
                os.kill(os.getpid(), 2)  # SIGINT: Python raises KeyboardInterrupt here
            else:
                raise KeyboardInterrupt


class CountSteps(Callback):
    """Counts the optimizer steps actually applied (a post-step hook on the optimizer)."""

    applied = []

    def on_train_begin(self, net, **kwargs):
        CountSteps.applied.clear()
        net.optimizer_.register_step_post_hook(lambda *a: CountSteps.applied.append(1))


def _replayed_params(att, multipliers=None):
    with module_mode(att.net_.module_, training=True):
        return replay_training(att.trajectory_, att._loss_fn(), att._data_fn(), multipliers)


# ---------------------------------------------------------------------------- Ctrl-C
def test_interrupt_mid_batch_attributes_the_steps_applied():
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    net = _net(callbacks=[("count", CountSteps()), ("stop", InterruptAt(5))])
    att = HydraAttributor(net, mode="exact", random_state=0, verbose=0)
    with pytest.warns(UserWarning, match=r"interrupted \(KeyboardInterrupt\) after 4 "
                                         r"optimizer steps, in epoch 2 of max_epochs=3"):
        att.fit(X, y)
    assert att.interrupted_
    # the fifth batch never updated the weights: four steps applied, four recorded
    assert len(CountSteps.applied) == 4 and len(att.trajectory_) == 4
    # replaying the recorded steps reproduces the trained weights (float64: the same
    # operations up to summation order, 1e-12 relative; an extra step moves them by ~1e-2)
    theta = flat_params(att.net_, att.spec_)
    np.testing.assert_allclose(_replayed_params(att).numpy(), theta.numpy(), rtol=1e-12,
                               atol=1e-12 * float(theta.abs().max()))
    # exact C equals central finite differences of replaying the steps taken. Truncation
    # O(h^2) ~ 1e-8 relative, rounding ~ 1e-16 / h; 1e-6 of max|C| leaves a margin
    C = att.attribute(Xt, yt)
    loss_fn = att._loss_fn()
    xt, ytt = att._to_tensors(Xt, yt)
    h = 1e-4

    def test_losses(m):
        th = _replayed_params(att, m)
        with module_mode(att.net_.module_, training=False), torch.no_grad():
            return loss_fn(th, xt, ytt).numpy()

    rows = np.unique(np.concatenate(att.trajectory_.indices))[::3]
    for i in rows:
        m = np.ones(N)
        m[i] = 1 + h
        lp = test_losses(m)
        m[i] = 1 - h
        C_fd = -(lp - test_losses(m)) / (2 * h)
        np.testing.assert_allclose(C[i], C_fd, rtol=0, atol=1e-6 * np.abs(C).max())


def test_interrupt_at_the_first_batch_is_a_clear_error():
    X, y = three_blobs(N, 0)
    with pytest.raises(RuntimeError, match="no optimizer step was recorded"):
        HydraAttributor(_net(callbacks=[("stop", InterruptAt(1))]), verbose=0).fit(X, y)


def test_early_stopping_is_no_interrupt():
    # EarlyStopping ends training with a KeyboardInterrupt between epochs: no warning
    X, y = three_blobs(N, 0)
    stop = EarlyStopping(monitor="train_loss", patience=1, threshold=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        att = HydraAttributor(_net(max_epochs=5, callbacks=[("es", stop)]), mode="exact",
                              verbose=0).fit(X, y)
    epochs = len(att.net_.history)
    assert not att.interrupted_ and epochs < 5 and len(att.trajectory_) == 3 * epochs


_SIGINT_SCRIPT = textwrap.dedent("""
    import signal, sys, warnings
    # as in an interactive session: a parent started in the background (nohup, CI
    # runners) passes SIGINT down ignored, and an ignored Ctrl-C never reaches fit
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[:0] = [{tests!r}]
    import numpy as np, torch
    torch.set_num_threads(1)
    from test_refusals import CountSteps, InterruptAt, _net, _replayed_params
    from _blobs import three_blobs
    from hydrattr import HydraAttributor
    from hydrattr._skorch import flat_params
    X, y = three_blobs(60, 0)
    net = _net(callbacks=[("count", CountSteps()), ("stop", InterruptAt(5, sigint=True))])
    att = HydraAttributor(net, mode="exact", random_state=0, verbose=0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        att.fit(X, y)
    theta = flat_params(att.net_, att.spec_)
    err = float((_replayed_params(att) - theta).abs().max() / theta.abs().max())
    print("applied", len(CountSteps.applied), "recorded", len(att.trajectory_),
          "interrupted", att.interrupted_, "replay_err", err)
    print("warning", [str(x.message) for x in w if "interrupted" in str(x.message)])
""")


def test_sigint_in_a_subprocess_records_only_applied_steps(tmp_path):
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "sigint.py"
    script.write_text(_SIGINT_SCRIPT.format(tests=tests))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[-2:]
    fields = first.split()
    assert fields[:6] == ["applied", "4", "recorded", "4", "interrupted", "True"], first
    assert float(fields[7]) < 1e-12, first  # float64 replay of the recorded steps
    assert "interrupted (KeyboardInterrupt) after 4 optimizer steps" in second


# ------------------------------------------------------------------------ divergence
def test_diverging_learning_rate_is_refused():
    rng = np.random.RandomState(0)
    X = rng.randn(N, 4).astype(np.float32)
    y = (X @ np.ones(4))[:, None].astype(np.float32)
    net = NeuralNetRegressor(torch.nn.Linear, module__in_features=4, module__out_features=1,
                             lr=5.0, batch_size=10, max_epochs=20, train_split=None, verbose=0)
    with pytest.raises(ValueError, match=r"Training diverged: the training loss was not "
                                         r"finite at step \d+.*NaN or infinite.*net.lr=5.0"):
        HydraAttributor(net, verbose=0).fit(X, y)


def test_nllloss_on_logits_warns_and_is_refused():
    X, y = three_blobs(N, 0)
    with pytest.warns(UserWarning, match="NLLLoss does not match the module's output.*"
                                         "class probabilities"):
        with pytest.raises(ValueError, match="Training diverged"):
            HydraAttributor(_net(criterion=torch.nn.NLLLoss), verbose=0).fit(X, y)


def test_nllloss_on_probabilities_does_not_warn():
    X, y = three_blobs(N, 0)

    class Softmax(MLP):
        def forward(self, x):
            return torch.softmax(super().forward(x), dim=-1)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HydraAttributor(_net(module=Softmax, criterion=torch.nn.NLLLoss), verbose=0).fit(X, y)


# ------------------------------------------------------------ updates not recorded
def test_gradient_clipping_is_refused_by_name():
    X, y = three_blobs(N, 0)
    net = _net(lr=0.5, callbacks=[("clip", GradientNormClipping(gradient_clip_value=0.05))])
    with pytest.raises(ValueError, match=r"gradient was changed after backpropagation.*"
                                         r"in \d+ of 9 steps.*clip \(GradientNormClipping\)"):
        HydraAttributor(net, verbose=0).fit(X, y)


def test_clipping_that_never_clips_changes_nothing():
    # the threshold is never reached: the update is untouched, so nothing is refused and
    # C equals the run without the callback bit for bit (same float operations)
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    clip = [("clip", GradientNormClipping(gradient_clip_value=1e6))]
    C0 = HydraAttributor(_net(), random_state=0, verbose=0).fit(X, y).attribute(Xt, yt)
    C1 = HydraAttributor(_net(callbacks=clip), random_state=0,
                         verbose=0).fit(X, y).attribute(Xt, yt)
    np.testing.assert_array_equal(C0, C1)


class ShrinkWeights(Callback):
    def on_epoch_end(self, net, **kwargs):
        with torch.no_grad():
            for p in net.module_.parameters():
                p.mul_(0.99)


def test_callback_editing_weights_is_refused_by_name():
    X, y = three_blobs(N, 0)
    with pytest.raises(ValueError, match=r"parameters were changed outside an optimizer step "
                                         r"3 time\(s\).*shrink \(ShrinkWeights\)"):
        HydraAttributor(_net(callbacks=[("shrink", ShrinkWeights())]), verbose=0).fit(X, y)


class PenalisedNet(NeuralNetClassifier):
    """Adds an L2 penalty in the train step, outside get_loss: hydrattr cannot see it."""

    def train_step_single(self, batch, **fit_params):
        self._set_training(True)
        Xi, yi = batch
        y_pred = self.infer(Xi, **fit_params)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        loss = loss + sum((p ** 2).sum() for p in self.module_.parameters())
        loss.backward()
        return {"loss": loss, "y_pred": y_pred}


def test_update_outside_get_loss_is_refused():
    X, y = three_blobs(N, 0)
    params = _net().get_params()
    params = {k: v for k, v in params.items() if "__" not in k or k.split("__")[0] in (
        "module", "optimizer", "iterator_train")}
    net = PenalisedNet(**params)
    with pytest.raises(ValueError, match="differs from the gradient of the net's loss"):
        HydraAttributor(net, verbose=0).fit(X, y)


# ------------------------------------------------------------------------- memmap
class Trained(Callback):
    calls = []

    def on_train_begin(self, net, **kwargs):
        Trained.calls.append(1)


def test_full_disk_is_an_oserror_naming_store_dir_before_training(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    X, y = three_blobs(N, 0)
    Trained.calls.clear()
    att = HydraAttributor(_net(callbacks=[("t", Trained())]), storage="memmap",
                          store_dir=str(tmp_path), verbose=0)
    with pytest.raises(OSError, match=f"store_dir='{tmp_path}'.*No space left") as info:
        att.fit(X, y)
    assert info.value.errno == errno.ENOSPC
    assert Trained.calls == []  # refused before training
    assert os.listdir(tmp_path) == []


def test_file_system_without_fallocate_falls_back(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    dense = HydraAttributor(_net(), random_state=0, verbose=0).fit(X, y)
    mm = HydraAttributor(_net(), storage="memmap", store_dir=str(tmp_path), random_state=0,
                         verbose=0).fit(X, y)
    np.testing.assert_array_equal(mm.attribute(Xt, yt), dense.attribute(Xt, yt))


def test_store_dir_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    X, y = three_blobs(N, 0)
    f = tmp_path / "a-file"
    f.write_text("")
    for kw in ({"storage": "memmap"}, {"trajectory": "memmap"}):
        with pytest.raises(NotADirectoryError, match=f"store_dir='{f}' is a file"):
            HydraAttributor(_net(), store_dir=str(f), verbose=0, **kw).fit(X, y)

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(PermissionError, match=f"store_dir='{tmp_path}'.*Permission denied"):
        HydraAttributor(_net(), storage="memmap", store_dir=str(tmp_path), verbose=0).fit(X, y)


# ------------------------------------------------------------------------- targets
@pytest.mark.parametrize("bad, match", [
    (3, r"y holds class labels outside \[0, 3\).*max 3"),
    (-1, r"y holds class labels outside \[0, 3\).*min -1"),
    (0.5, "y must hold integer class indices.*non-integral"),
])
def test_labels_the_module_cannot_take(bad, match):
    X, y = three_blobs(N, 0)
    y = y.astype(type(bad))
    y[7] = bad
    with pytest.raises(ValueError, match=match):
        HydraAttributor(_net(), verbose=0).fit(X, y)


def test_label_shapes_and_kinds_are_named():
    X, y = three_blobs(N, 0)
    with pytest.raises(ValueError, match=r"y must have shape \(n_samples,\).*\(60, 2\)"):
        HydraAttributor(_net(), verbose=0).fit(X, np.stack([y, y], 1))
    att = HydraAttributor(_net(), verbose=0).fit(X, y)
    Xt, yt = three_blobs(N_TEST, 1)
    with pytest.raises(ValueError, match="y_test must hold integer class indices.*LabelEncoder"):
        att.attribute(Xt, np.array(["a", "b", "c", "a", "b"]))
    with pytest.raises(ValueError, match=r"y_test holds class labels outside \[0, 3\)"):
        att.attribute(Xt, yt + 10)


def test_regression_target_that_would_broadcast():
    rng = np.random.RandomState(0)
    X = rng.randn(N, 4)
    y = X @ np.ones(4)
    net = NeuralNetRegressor(torch.nn.Linear, module__in_features=4, module__out_features=1,
                             module__dtype=torch.float64, lr=0.01, batch_size=10, max_epochs=1,
                             train_split=None, verbose=0)
    with pytest.raises(ValueError, match=r"y has shape \(60,\), but the module's output has "
                                         r"shape \(n_samples, 1\).*broadcast.*reshape\(-1, 1\)"):
        HydraAttributor(net, verbose=0).fit(X, y)
    att = HydraAttributor(net, verbose=0).fit(X, y[:, None])
    with pytest.raises(ValueError, match=r"y_test has shape \(5,\)"):
        att.attribute(X[:5], y[:5])


@pytest.mark.parametrize("param, value", [("verbose", "loud"), ("mode", "slow"),
                                          ("test_batch_size", 0), ("last_epochs", True),
                                          ("store_dir", 3)])
def test_bad_parameters_are_named(param, value):
    X, y = three_blobs(N, 0)
    with pytest.raises(ValueError, match=f"The '{param}' parameter of HydraAttributor"):
        HydraAttributor(_net(), **{param: value}).fit(X, y)


# ------------------------------------------------------- warnings a user should not see
_CLEAN_SCRIPT = textwrap.dedent("""
    import sys, warnings
    sys.path[:0] = [{tests!r}]
    import numpy as np, pandas as pd, torch
    torch.set_num_threads(1)
    from _blobs import bn_dropout_net, three_blobs
    from hydrattr import HydraAttributor, InfluenceFunctionAttributor
    from test_refusals import _net
    X, y = three_blobs(40, 0)
    Xt, yt = three_blobs(4, 1)
    warnings.simplefilter("error")  # every warning from here on fails the script
    df, s = pd.DataFrame(X, columns=list("abcd")), pd.Series(y)
    att = HydraAttributor(bn_dropout_net(max_epochs=1), mode="exact", verbose=0).fit(df, s)
    att.attribute(pd.DataFrame(Xt, columns=list("abcd")), pd.Series(yt))
    InfluenceFunctionAttributor(_net(lr=0.5, module__hidden=()), verbose=0).fit(X, y) \\
        .attribute(Xt, yt)
    print("clean")
""")


def test_exact_mode_pandas_and_default_influence_warn_nothing(tmp_path):
    # a fresh process: torch warns about jit.script and non-writable arrays once per
    # process, so only a new one shows whether a user's first run is clean
    tests = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / "clean.py"
    script.write_text(_CLEAN_SCRIPT.format(tests=tests))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("clean"), out.stderr[-3000:]
