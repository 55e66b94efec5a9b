"""Checkpointed trajectories (``HydraAttributor(trajectory="checkpoint")``).

* Exact-mode ``C`` from a checkpointed trajectory equals ``C`` from the stored one
  **bitwise** (tolerance 0), and so does every recomputed ``theta(t)``: on the CPU the
  recomputation is skorch's own training step on the recorded batch, hyperparameters and
  RNG state, from the recorded state, i.e. the same ops in the same order on the same
  numbers, and the sweep then reads the same parameters. A tolerance would hide a
  recomputation that differs from training (a missing momentum buffer, a learning rate
  off by a schedule step, another dropout mask all move C by far more than rounding, but
  a last-bit slip would still be a bug here). Cases: SGD with momentum and weight decay
  (float32), with dropout, with BatchNorm, with a StepLR schedule, all of them together
  with a truncated window, Adam.
* Memory, counted rather than timed: the parameter snapshots held at once (checkpoints
  plus recomputed ones, ``peak_held_``) never exceed ``2 sqrt(T)``, also when training
  stops before the planned number of steps (more levels), for many ``T``.
* Refusals: a step the record does not determine (random noise outside dropout layers)
  raises at fit; a recomputation within rounding of the record warns, beyond it raises;
  bad parameter values raise clear errors.
"""
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import EarlyStopping, LRScheduler
from sklearn.utils._param_validation import InvalidParameterError
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor
from hydrattr._core.checkpoint import (CheckpointedTrajectory, ModuleReplayer, best_spacing,
                                       capture_state, inner_strides, snapshot_budget)
from hydrattr._core.functional import ParamSpec
from hydrattr.models import MLP

from _blobs import three_blobs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N, N_TEST = 100, 6


def _net(dtype=torch.float64, dropout=0.0, batchnorm=False, schedule=False, adam=False,
         **kw):
    params = dict(module=MLP, module__n_features=4, module__n_classes=3, module__hidden=(8,),
                  module__activation="tanh", module__dropout=dropout,
                  module__batchnorm=batchnorm, module__dtype=dtype,
                  criterion=torch.nn.CrossEntropyLoss, batch_size=20, max_epochs=3,
                  train_split=None, verbose=0, iterator_train__shuffle=True)
    if adam:
        params.update(optimizer=torch.optim.Adam, lr=0.01, optimizer__weight_decay=1e-3)
    else:
        params.update(optimizer=torch.optim.SGD, lr=0.1, optimizer__momentum=0.9,
                      optimizer__weight_decay=1e-3)
    if schedule:
        params["callbacks"] = [("lr", LRScheduler(StepLR, step_size=1, gamma=0.5))]
    params.update(kw)
    return NeuralNetClassifier(**params)


CASES = {
    "momentum_weight_decay_float32": dict(dtype=torch.float32),
    "dropout": dict(dropout=0.3),
    "batchnorm": dict(batchnorm=True),
    "scheduler": dict(schedule=True, optimizer__nesterov=True),
    "all_truncated": dict(dropout=0.2, batchnorm=True, schedule=True, last_epochs=2),
    "adam_dropout_batchnorm": dict(adam=True, dropout=0.2, batchnorm=True),
}


def _pair(case, **extra):
    kw = dict(CASES[case])
    last = kw.pop("last_epochs", None)
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    out = []
    for traj in ("memory", "checkpoint"):
        att = HydraAttributor(_net(**kw), mode="exact", trajectory=traj, last_epochs=last,
                              random_state=0, verbose=0, **extra.get(traj, {}))
        att.fit(X, y)
        out.append((att, att.attribute(Xt, yt)))
    return out, Xt, yt


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_C_equals_stored_C_bitwise(case):
    ((stored, C), (ckpt, C2)), _, _ = _pair(case)
    traj = ckpt.trajectory_
    T = len(traj)
    assert T == len(stored.trajectory_) == 15
    assert np.all(np.isfinite(C[ckpt.rows_]))
    np.testing.assert_array_equal(C2, C)  # tolerance 0: see the module docstring
    for t in range(T - 1, -1, -1):
        assert torch.equal(traj.theta(t), stored.trajectory_.theta(t)), t
        s1, s2 = traj.opt_state(t), stored.trajectory_.opt_state(t)
        assert (s1 is None) == (s2 is None)
        if s1 is not None:
            assert all(torch.equal(a, b) for a, b in zip(s1, s2))
    # memory, counted: checkpoints plus one block's buffer
    assert traj.peak_held_ <= 2 * math.sqrt(T), (traj.peak_held_, T)
    assert len(traj._ckpts) == math.ceil(T / traj.stride) < T
    # each sweep recomputes every step once (plus one check step per block)
    assert traj.recomputed_steps_ <= 3 * T


def test_pickled_checkpointed_attributor_attributes_identically():
    ((_, C), (ckpt, C2)), Xt, yt = _pair("dropout")
    again = pickle.loads(pickle.dumps(ckpt))
    assert again.trajectory_.held_ == len(again.trajectory_._ckpts)  # no buffer pickled
    np.testing.assert_array_equal(again.attribute(Xt, yt), C)


def test_given_spacing_and_early_stopping():
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    # an int spacing: ceil(T / k) checkpoints plus a buffer of k - 1
    a = HydraAttributor(_net(dropout=0.2), mode="exact", random_state=0, verbose=0).fit(X, y)
    b = HydraAttributor(_net(dropout=0.2), mode="exact", trajectory="checkpoint",
                        checkpoint_every=2, random_state=0, verbose=0).fit(X, y)
    np.testing.assert_array_equal(b.attribute(Xt, yt), a.attribute(Xt, yt))
    assert b.trajectory_.stride == 2 and len(b.trajectory_._ckpts) == 8
    assert b.trajectory_.peak_held_ <= 8 + 1
    # training planned for 40 epochs (200 steps, spacing 14) and stopped after a few:
    # the blocks are recomputed in more levels to stay within 2 sqrt(T)
    stop = [("stop", EarlyStopping(monitor="train_loss", patience=1, threshold=10.0))]
    net = _net(batchnorm=True, max_epochs=40, callbacks=stop)
    a = HydraAttributor(net, mode="exact", random_state=0, verbose=0).fit(X, y)
    b = HydraAttributor(net, mode="exact", trajectory="checkpoint", random_state=0,
                        verbose=0).fit(X, y)
    traj = b.trajectory_
    T = len(traj)
    assert T < 40 and traj.planned_steps == 200 and traj.stride == best_spacing(200)
    np.testing.assert_array_equal(b.attribute(Xt, yt), a.attribute(Xt, yt))
    assert len(traj._strides()) > 2 and traj.peak_held_ <= 2 * math.sqrt(T)


# -- the schedule on a plain torch model ------------------------------------------------
def _toy_run(T, plan, every="auto", adam=False):
    """A tiny SGD (or Adam) run of ``T`` steps recorded in full and checkpointed."""
    torch.manual_seed(0)
    X = torch.randn(64, 3, dtype=torch.float64)
    y = torch.randn(64, 2, dtype=torch.float64)
    m = torch.nn.Linear(3, 2, dtype=torch.float64)
    opt = torch.optim.Adam(m.parameters(), lr=0.01) if adam else \
        torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    spec = ParamSpec([n for n, _ in m.named_parameters()], [p.shape for p in m.parameters()],
                     [sum(p.numel() for p in m.parameters())])
    rng = np.random.RandomState(0)
    rows = [rng.choice(64, 8, replace=False) for _ in range(T)]

    def data_fn(r):
        r = torch.as_tensor(np.asarray(r))
        return X[r], y[r]

    def train_step(module, optimizer):
        def step(x, t):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(module(x), t).backward()
            optimizer.step()
        return step

    traj = CheckpointedTrajectory(spec, 64, every=every, dtype=torch.float64)
    traj.plan(plan)
    stored, step = [], train_step(m, opt)
    params = list(m.parameters())
    for t in range(T):
        theta = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        stored.append(theta)
        state = capture_state(m, opt) if traj.wants(t) else None
        g = opt.param_groups[0]
        row = {"lr": [g["lr"]], "weight_decay": [g["weight_decay"]]}
        if adam:
            row.update(beta1=[g["betas"][0]], beta2=[g["betas"][1]], eps=[g["eps"]],
                       decoupled=[False], step=[t + 1.0])
        else:
            row.update(momentum=[0.9], dampening=[0.0], nesterov=[False],
                       first=[t == 0])
        traj.append(theta, rows[t], 1 / 8, row, state=state)
        step(*data_fn(rows[t]))
    final = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    traj.finish(final)

    def factory():
        import copy
        m2, opt2 = copy.deepcopy((m, opt))
        return ModuleReplayer(m2, opt2, train_step(m2, opt2), data_fn)

    traj.bind(factory, final=lambda: final)
    return traj, stored


@pytest.mark.parametrize("T", [1, 2, 3, 5, 10, 17, 50, 97])
@pytest.mark.parametrize("factor", [1, 4, 30])
def test_snapshots_held_stay_within_two_sqrt_T(T, factor):
    traj, stored = _toy_run(T, plan=factor * T)
    held_recording = traj.held_
    assert held_recording == len(traj._ckpts) <= snapshot_budget(factor * T)
    for t in range(T - 1, -1, -1):  # the reverse sweep's order
        assert torch.equal(traj.theta(t), stored[t]), t
    assert traj.peak_held_ <= 2 * math.sqrt(T), (traj.peak_held_, traj._strides())
    # one recomputation per step and level, plus one check step per block
    levels = len(traj._strides()) - 1
    assert traj.recomputed_steps_ <= levels * T + len(traj._ckpts)
    # forward order (fast mode's replay, the forward recurrence) works as well
    for t in range(T):
        assert torch.equal(traj.theta(t), stored[t]), t


def test_adam_state_is_recomputed():
    traj, stored = _toy_run(20, plan=20, adam=True)
    for t in range(19, -1, -1):
        assert torch.equal(traj.theta(t), stored[t])
        m, v = traj.opt_state(t)
        assert m.shape == v.shape == stored[t].shape
    assert not torch.equal(traj.opt_state(5)[0], torch.zeros_like(stored[0]))


def test_spacing_and_strides():
    for T in range(1, 600):
        k = best_spacing(T)
        assert math.ceil(T / k) + k == math.ceil(2 * math.sqrt(T) - 1e-12)
        assert math.ceil(T / k) + k - 1 <= snapshot_budget(T) <= 2 * math.sqrt(T)
    for block in (2, 7, 20, 100, 1000):
        for extra in range(block.bit_length(), block + 2):
            strides = inner_strides(block, extra)
            assert strides[-1] == 1 and strides == sorted(strides, reverse=True)
            held, prev = 0, block
            for s in strides:
                held += math.ceil(prev / s) - 1
                prev = s
            assert held <= extra, (block, extra, strides)


# -- refusals and errors ----------------------------------------------------------------
class NoisyMLP(torch.nn.Module):
    """Random noise outside dropout layers: its RNG state is not recorded."""

    def __init__(self):
        super().__init__()
        self.l1 = torch.nn.Linear(4, 8, dtype=torch.float64)
        self.l2 = torch.nn.Linear(8, 3, dtype=torch.float64)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l2(h + 0.1 * torch.randn_like(h))


@pytest.mark.parametrize("every", ["auto", 9])  # 9: the last step is a checkpoint
def test_a_step_the_record_does_not_determine_is_refused_at_fit(every):
    X, y = three_blobs(N, 0)
    net = NeuralNetClassifier(NoisyMLP, criterion=torch.nn.CrossEntropyLoss,
                              optimizer=torch.optim.SGD, lr=0.1, batch_size=20,
                              max_epochs=2, train_split=None, verbose=0)
    att = HydraAttributor(net, mode="exact", trajectory="checkpoint",
                          checkpoint_every=every, random_state=0, verbose=0)
    with pytest.raises(ValueError, match="not determined by what was recorded"):
        att.fit(X, y)


@pytest.mark.parametrize("size, outcome", [(1e-13, "warns"), (1e-3, "raises")])
def test_a_recomputation_off_the_record_warns_or_raises(size, outcome):
    X, y = three_blobs(N, 0)
    Xt, yt = three_blobs(N_TEST, 1)
    att = HydraAttributor(_net(), mode="exact", trajectory="checkpoint", random_state=0,
                          verbose=0).fit(X, y)
    traj = att.trajectory_
    k = traj.stride
    traj._ckpts[k][0][0] += size * (1 + abs(float(traj._ckpts[k][0][0])))  # the record
    traj.bind(traj._factory, final=traj._final)  # drop the buffers
    if outcome == "warns":
        with pytest.warns(RuntimeWarning, match="not bit-for-bit"):
            att.attribute(Xt, yt)
    else:
        with pytest.raises(ValueError, match="did not reproduce the recorded parameters"):
            att.attribute(Xt, yt)


@pytest.mark.parametrize("value", [0, -3, 1.5, "sqrt", None, True])
def test_bad_checkpoint_every_is_refused(value):
    X, y = three_blobs(N, 0)
    att = HydraAttributor(_net(), mode="exact", trajectory="checkpoint",
                          checkpoint_every=value, verbose=0)
    with pytest.raises(InvalidParameterError, match="checkpoint_every"):
        att.fit(X, y)


def test_inconsistent_settings_are_refused():
    X, y = three_blobs(N, 0)
    with pytest.raises(ValueError, match="applies only with trajectory='checkpoint'"):
        HydraAttributor(_net(), mode="exact", checkpoint_every=4, verbose=0).fit(X, y)
    with pytest.raises(ValueError, match="fast mode with storage='dense' keeps no"):
        HydraAttributor(_net(), mode="fast", trajectory="checkpoint", verbose=0).fit(X, y)
    with pytest.raises(InvalidParameterError, match="trajectory"):
        HydraAttributor(_net(), trajectory="disk", verbose=0).fit(X, y)
    with pytest.raises(ValueError, match="every"):
        CheckpointedTrajectory(ParamSpec(["w"], [(2,)], [2]), 4, every=0)
    # fast mode through the trajectory (storage="replay") is fine, and equals the stored
    Xt, yt = three_blobs(N_TEST, 1)
    C = [HydraAttributor(_net(dropout=0.2), mode="fast", storage="replay", trajectory=tr,
                         random_state=0, verbose=0).fit(X, y).attribute(Xt, yt)
         for tr in ("memory", "checkpoint")]
    np.testing.assert_array_equal(C[1], C[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HydraAttributor(_net(), mode="exact", trajectory="checkpoint", verbose=0,
                        random_state=0).fit(X, y)
