"""The fused fast-mode fit (``fit_path="fused"``) against the two-pass fit and the algebra.

* ``sgd_transition`` is ``tangent_step`` on unit inputs; ``RangeProducts`` equals the
  plain product of any range of steps.
* ``LazyStore`` fed with random per-sample terms under random hyperparameters (two groups,
  momentum, dampening, Nesterov, weight decay, the first-step buffer, resets) equals the
  sum with the fast-mode coefficients of ``fast_coefficients`` (dense and memmap to
  float64 rounding; half to float16 resolution).
* ``PerSampleHooks`` (Linear on 2-D and 3-D inputs, a layer called twice, Conv2d with
  padding, stride, dilation, groups, without bias) equals ``vmap`` per-sample gradients,
  and with dropout the Jacobian rows through the same masks.
* ``HydraAttributor(fit_path="fused")`` gives the two-pass ``C`` on the same trajectory
  to float64 rounding for every storage kind, track, last_epochs (int, "final_lr", and a
  window only known at the end), param groups with Nesterov and ReduceLROnPlateau,
  dropout (hooks), BatchNorm (per-step Jacobian), a conv net (hooks), a parameter used
  outside its layer (hooks refused at the first step); equals the naive float64 forward
  recurrence; trains bit-identically to ``net.fit``; Adam takes the two-pass route.
"""
import numpy as np
import pytest
import torch
from sklearn.base import clone
from skorch import NeuralNetClassifier
from skorch.callbacks import LRScheduler
from torch import nn
from torch.func import functional_call
from torch.optim.lr_scheduler import StepLR

from hydrattr import HydraAttributor
from hydrattr._core.functional import ParamSpec, per_sample_grads
from hydrattr._core.fused import (LazyStore, LeanTrajectory, PerSampleHooks, RangeProducts,
                                  _combine, _finish_part, _fresh_part, _step_part,
                                  _to_state, sgd_transition)
from hydrattr._core.sgd import SGDHyper, fast_coefficients, tangent_step
from hydrattr._core.store import SampleStore
from hydrattr.models import MLP

from _blobs import groups_nesterov_plateau  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N, D, K = 120, 6, 3
LR, MOM, DAMP, WD, BS, EPOCHS = 0.05, 0.9, 0.1, 1e-3, 16, 4


# -- the algebra --------------------------------------------------------------------------
def _random_rows(T, rs, groups=2):
    """Per-step hyperparameter rows as the recorder writes them: schedules, first steps."""
    rows = []
    for t in range(T):
        rows.append({
            "lr": [float(0.1 * 0.7 ** (t // 5)), float(rs.uniform(0.01, 0.2))][:groups],
            "momentum": [0.9, 0.5][:groups],
            "dampening": [0.1, 0.0][:groups],
            "weight_decay": [1e-2, 0.0][:groups],
            "nesterov": [False, True][:groups],
            "first": [t == 0, t == 0][:groups]})
    return rows


def test_transition_is_tangent_step():
    rs = np.random.RandomState(0)
    for row in _random_rows(3, rs):
        h = SGDHyper.from_rows([row]).at(0)
        M, b = sgd_transition(h)
        x = torch.as_tensor(rs.randn(3, 2), dtype=torch.float64)
        th, v = tangent_step(x[0], x[1], x[2], h, lambda z: z)
        ours = np.einsum("gij,jg->ig", M, x[:2].numpy()) + b.T * x[2].numpy()
        np.testing.assert_allclose(ours, torch.stack([th, v]).numpy(), rtol=1e-14, atol=1e-15)


def test_range_products_equal_plain_products():
    rs = np.random.RandomState(1)
    Ms = rs.randn(37, 2, 2, 2)
    rp = RangeProducts(2)
    for t, M in enumerate(Ms):
        rp.append(M)
        starts = rs.randint(0, t + 1, size=6)
        lengths = np.array([rs.randint(0, t + 2 - s) for s in starts])
        got = rp.product(starts, lengths)
        for s, L, g in zip(starts, lengths, got):
            want = np.broadcast_to(np.eye(2), (2, 2, 2)).copy()
            for k in range(s, s + L):
                want = Ms[k] @ want
            np.testing.assert_allclose(g, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="range"):
        rp.product([30], [10])


@pytest.mark.parametrize("kind", ["dense", "half", "memmap"])
def test_lazy_store_equals_fast_coefficient_sum(kind, tmp_path):
    rs = np.random.RandomState(2)
    T, n, sizes, B = 40, 9, [5, 3], 4
    rows = _random_rows(T, rs)
    batches = [rs.choice(n, B, replace=False) for _ in range(T)]
    terms = [torch.as_tensor(rs.randn(B, sum(sizes))) for _ in range(T)]
    start = 17  # a window beginning mid-run: LazyStore.reset() there
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    expand = ParamSpec(["a", "b"], [(5,), (3,)], sizes).expand
    want = torch.zeros(n, sum(sizes), dtype=torch.float64)
    for t in range(start, T):
        want[torch.as_tensor(batches[t])] += expand(coef[t]) * terms[t]
    dtype = torch.float32 if kind == "half" else torch.float64
    lazy = LazyStore(SampleStore(n, sum(sizes), kind=kind, dtype=dtype, directory=tmp_path),
                     sizes, velocity=False, directory=tmp_path)  # velocity on first need
    for t in range(T):
        if t == start:
            lazy.reset()
        assert lazy.step(rows[t]) == t
        lazy.commit(batches[t], terms[t].to(dtype))
    got = lazy.finish().data
    got = torch.as_tensor(np.asarray(got)).double()
    if kind == "half":
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3 * float(want.abs().max()))
    else:
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert lazy.velocity is None


def test_lazy_store_without_steps_or_momentum():
    lazy = LazyStore(SampleStore(3, 2, dtype=torch.float64), [2], velocity=False)
    assert float(lazy.finish().data.abs().sum()) == 0
    row = {"lr": [0.1], "momentum": [0.0], "dampening": [0.0], "weight_decay": [0.5],
           "nesterov": [False], "first": [True]}
    lazy = LazyStore(SampleStore(3, 2, dtype=torch.float64), [2], velocity=False)
    g = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    lazy.step(row)
    lazy.commit([1], g)
    lazy.step(row)
    assert lazy.velocity is None  # plain SGD: no velocity part is ever allocated
    S = lazy.finish().data
    # d theta after the step: -lr g; the next step shrinks it by (1 - lr * wd)
    torch.testing.assert_close(S[1], -0.1 * g[0] * (1 - 0.1 * 0.5))
    with pytest.raises(RuntimeError, match="before any step"):
        LazyStore(SampleStore(3, 2), [2]).commit([0], torch.zeros(1, 2))


def test_combine_keeps_the_sum_divided_by_its_largest_coefficient():
    rs = np.random.RandomState(5)
    y1, y2 = (torch.as_tensor(rs.randn(7)) for _ in range(2))
    for own, c1, c2 in [(2.0, 0.5, -0.1), (0.1, -3.0, 1.0), (0.0, 0.5, 2.0), (0.0, 1.5, 0.0),
                        (0.3, 0.0, 0.0), (0.0, 0.0, 0.0), (-1e-9, 4.0, -7.0)]:
        x0 = torch.as_tensor(rs.randn(7))
        x = x0.clone()
        s = _combine(x, own, [(c1, y1), (c2, y2)])
        torch.testing.assert_close(s * x, own * x0 + c1 * y1 + c2 * y2, rtol=1e-14, atol=1e-15)
        assert abs(s) >= max(abs(own), abs(c1), abs(c2)) or s == 1.0


@pytest.mark.parametrize("psi, b", [
    ([[0.99, -0.09], [2e-4, -1.7e-5]], [-0.01, 1.0]),  # SGD over an epoch: nearly rank one
    ([[1.0, -0.5], [0.0, 0.9]], [-0.1, 1.0]),            # no weight decay: a10 = 0
    ([[0.0, 0.7], [0.3, 0.2]], [0.5, -1.0]),              # a00 = 0
    ([[0.8, 0.0], [0.4, 0.0]], [-0.1, 1.0]),              # through a first step: rank one
    ([[0.8, 0.0], [0.4, 0.0]], [0.0, 0.0]),               # ... and no injection
    ([[0.0, 0.0], [0.0, 0.0]], [0.2, 0.7]),               # everything so far mapped to zero
])
def test_step_part_equals_the_direct_update(psi, b):
    """Coordinates in a row's own basis brought forward by _step_part give the direct
    update ``psi s + b g``, from a fresh row and from any basis (columns swapped,
    scaled, one of them zero, i.e. an unused coordinate holding garbage)."""
    rs = np.random.RandomState(6)
    psi_ = torch.as_tensor(psi, dtype=torch.float64)
    bt = torch.as_tensor(b, dtype=torch.float64)
    for B in ([[1.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [-0.5, 0.0]], [[0.6, -0.8], [0.8, 0.6]],
              [[2.0, 0.0], [-1.0, 0.0]]):
        x = torch.as_tensor(rs.randn(2, 11))
        if B[0][1] == 0 and B[1][1] == 0:
            x[1] = float("nan")  # an unused coordinate is never read
        Bt = torch.as_tensor(B, dtype=torch.float64)
        s = Bt @ torch.nan_to_num(x, nan=0.0)
        g = torch.as_tensor(rs.randn(11))
        new = _step_part(x[0], x[1], g, (psi_ @ Bt).tolist(), b)
        Bn = torch.as_tensor(new, dtype=torch.float64)
        assert abs(float(Bn[:, 0] @ Bn[:, 1])) <= 1e-8 * float(Bn[:, 0].norm() * Bn[:, 1].norm())
        got = Bn @ torch.where(Bn.abs().sum(0)[:, None] > 0, x, 0.0)
        torch.testing.assert_close(got, psi_ @ s + bt[:, None] * g, rtol=1e-13, atol=1e-13)
        xp = x[0].clone()
        _finish_part(xp, x[1], new)
        torch.testing.assert_close(xp, got[0], rtol=1e-13, atol=1e-13)
    x = torch.full((2, 11), float("nan"), dtype=torch.float64)
    new = torch.as_tensor(_fresh_part(x[0], g, b), dtype=torch.float64)
    torch.testing.assert_close(new @ torch.nan_to_num(x, nan=0.0), bt[:, None] * g)


def test_to_state_leaves_the_state_and_reads_no_unused_coordinate():
    rs = np.random.RandomState(8)
    for B in ([[0.6, -0.8], [0.8, 0.6]], [[2.0, 0.0], [-1.0, 0.0]], [[0.0, 3.0], [0.0, 1.0]],
              [[0.0, 0.0], [0.0, 0.0]]):
        x = torch.as_tensor(rs.randn(2, 5))
        Bt = torch.as_tensor(B, dtype=torch.float64)
        used = Bt.abs().sum(0) > 0
        x[~used] = float("nan")
        want = Bt @ torch.where(used[:, None], x, 0.0)
        assert _to_state(x[0], x[1], B) == [[1.0, 0.0], [0.0, 1.0]]
        torch.testing.assert_close(x, want, rtol=1e-14, atol=1e-15)
    x = torch.as_tensor(rs.randn(5))
    want = 0.5 * x
    assert _to_state(x, None, [[0.5, 0.0], [0.0, 0.0]]) == [[1.0, 0.0], [0.0, 0.0]]
    torch.testing.assert_close(x, want)


def test_lazy_store_over_many_commits_of_the_same_rows():
    """Rows committed at every step for 300 steps under strong decay and momentum: the
    coordinates never leave float range and the store equals the sum."""
    rs = np.random.RandomState(7)
    T, n, width = 300, 3, 4
    rows = [{"lr": [0.5], "momentum": [0.9], "dampening": [0.0], "weight_decay": [1.0],
             "nesterov": [False], "first": [t == 0]} for t in range(T)]
    terms = [torch.as_tensor(rs.randn(2, width)) for _ in range(T)]
    coef = fast_coefficients(SGDHyper.from_rows(rows))
    want = torch.zeros(n, width, dtype=torch.float64)
    lazy = LazyStore(SampleStore(n, width, dtype=torch.float32), [width])
    for t in range(T):
        lazy.step(rows[t])
        lazy.commit([0, 2], terms[t].float())
        want[[0, 2]] += coef[t] * terms[t]
        assert float(lazy.store.data[[0, 2]].abs().max()) < 1e3
        if t:  # (a row's velocity slot is unused, and not written, after its first term)
            assert float(lazy.velocity.data[[0, 2]].abs().max()) < 1e3
    assert len(lazy._transitions) == 2  # the first step's and every later step's
    got = lazy.finish().data.double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


# -- per-sample gradients from the backward pass ------------------------------------------
class _Shapes(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.c1 = nn.Conv2d(2, 4, 3, padding=1, stride=2, **kw)
        self.c2 = nn.Conv2d(4, 6, 3, padding=(1, 0), dilation=2, bias=False, **kw)
        self.c3 = nn.Conv2d(6, 4, 1, groups=2, **kw)
        self.l1 = nn.Linear(4, 5, **kw)
        self.l2 = nn.Linear(5 * 3, 3, **kw)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        h = torch.relu(self.c1(x))                   # (B, 4, 5, 5)
        h = torch.tanh(self.c2(h))                   # (B, 6, 3, 1)
        h = self.drop(self.c3(h)).flatten(2).transpose(1, 2)  # (B, 3, 4)
        h = torch.tanh(self.l1(h))                   # Linear on (B, 3, 4)
        h = h + 0.5 * torch.tanh(self.l1(h[..., :4]))  # the same layer called again
        return self.l2(h.flatten(1))


def _spec_and_loss(m):
    names = [n for n, _ in m.named_parameters()]
    spec = ParamSpec(names, [p.shape for p in m.parameters()],
                     [sum(p.numel() for p in m.parameters())])

    def loss_fn(theta, x, y):
        out = functional_call(m, spec.unflatten(theta), (x,))
        return nn.functional.cross_entropy(out, y, reduction="none")

    return spec, loss_fn, spec.flatten(dict(m.named_parameters())).detach()


@pytest.mark.parametrize("rows", [None, [1, 4, 6]])
def test_hooks_equal_vmap_per_sample_gradients(rows):
    torch.manual_seed(0)
    m = _Shapes()
    spec, loss_fn, theta = _spec_and_loss(m)
    x = torch.randn(7, 2, 9, 9, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    hooks = PerSampleHooks(m, spec)
    assert hooks.supported, hooks.reason
    hooks.attach()
    hooks.begin(None if rows is None else torch.tensor(rows), 7, torch.float64, "cpu")
    nn.functional.cross_entropy(m(x), y).backward()
    got = hooks.end()
    want = per_sample_grads(loss_fn, theta, x, y) / 7  # the batch loss is a mean
    want = want if rows is None else want[rows]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    m.zero_grad()
    m(x).sum().backward()  # not collecting: the hooks stay silent
    hooks.detach()
    assert hooks.buffer is None and not hooks._handles


@pytest.mark.parametrize("rows", [None, [1, 4, 6]])
def test_hooks_with_factored_linear_weights_equal_vmap_per_sample_gradients(rows):
    """Both Linear weights held as factors: l2 (one position) in the factor part, l1 (three
    positions, called twice) its first term there and five more from ``extras``. The
    full rows written back equal ``vmap``'s; ``factorable`` names l2 only."""
    from hydrattr._core.factors import FactorLayout

    torch.manual_seed(0)
    m = _Shapes()
    spec, loss_fn, theta = _spec_and_loss(m)
    x = torch.randn(7, 2, 9, 9, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    offsets = dict(zip(spec.names, np.concatenate([[0], np.cumsum(spec.numels)])))
    layout = FactorLayout(spec.n_params, [(offsets["l1.weight"], 5, 4),
                                          (offsets["l2.weight"], 3, 15)])
    hooks = PerSampleHooks(m, spec).attach()
    hooks.set_layout(layout)
    hooks.begin(None if rows is None else torch.tensor(rows), 7, torch.float64, "cpu")
    nn.functional.cross_entropy(m(x), y).backward()
    dense = hooks.end()
    extras = hooks.extras()
    assert dense.shape[1] == layout.dense_width and len(extras) == 5
    got = layout.materialize(dense, hooks.factors, torch.empty(len(dense), spec.n_params,
                                                               dtype=torch.float64))
    for e in extras:
        got += layout.materialize(torch.zeros_like(dense), e, torch.empty_like(got))
    want = per_sample_grads(loss_fn, theta, x, y) / 7
    want = want if rows is None else want[rows]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert hooks.factorable() == [(offsets["l2.weight"], 3, 15)]


def test_hooks_with_dropout_equal_jacobian_rows_through_the_same_masks():
    torch.manual_seed(0)
    m = _Shapes(dropout=0.4)
    spec, loss_fn, theta = _spec_and_loss(m)
    x = torch.randn(6, 2, 9, 9, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    rng = (torch.get_rng_state(), None)
    hooks = PerSampleHooks(m, spec).attach()
    hooks.begin(None, 6, torch.float64, "cpu")
    nn.functional.cross_entropy(m(x), y, reduction="sum").backward()
    got = hooks.end()
    want = per_sample_grads(loss_fn, theta, x, y, independent=False, rng_state=rng)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_hooks_refuse_what_they_cannot_compute():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.scale = nn.Parameter(torch.ones(2))

        def forward(self, x):
            return self.fc(x) * self.scale

    m = Bare()
    spec, _, _ = _spec_and_loss(m)
    hooks = PerSampleHooks(m, spec)
    assert not hooks.supported and "scale" in hooks.reason
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten())
    hooks = PerSampleHooks(m, _spec_and_loss(m)[0])
    assert not hooks.supported and "pads" in hooks.reason


def test_lean_trajectory_keeps_the_last_snapshot_only():
    spec = ParamSpec(["w"], [(2,)], [2])
    traj = LeanTrajectory(spec, 4)
    row = {"lr": [0.1], "momentum": [0.0], "dampening": [0.0], "weight_decay": [0.0],
           "nesterov": [False], "first": [True]}
    for t in range(3):
        traj.append(torch.full((2,), float(t)), [t], 1.0, row)
    traj.finish(torch.zeros(2))
    assert float(traj.theta(2)[0]) == 2.0 and float(traj.theta(-1)[0]) == 2.0
    with pytest.raises(RuntimeError, match="two_pass"):
        traj.theta(0)
    assert traj.nbytes == 0 and len(traj) == 3


# -- the fused fit against the two-pass fit -------------------------------------------------
def _data(n=N, seed=0):
    rs = np.random.RandomState(seed)
    X = rs.randn(n, D)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)
    return X, y


def _net(**kw):
    params = dict(module=MLP, module__n_features=D, module__n_classes=K, module__hidden=(8,),
                  module__activation="tanh", module__dtype=torch.float64,
                  criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=LR,
                  optimizer__momentum=MOM, optimizer__dampening=DAMP,
                  optimizer__weight_decay=WD, batch_size=BS, max_epochs=EPOCHS,
                  train_split=None, verbose=0, iterator_train__shuffle=True,
                  callbacks=[("sched", LRScheduler(StepLR, step_size=2, gamma=0.5))])
    params.update(kw)
    return NeuralNetClassifier(**params)


def _both(net, X, y, Xt, yt, **kw):
    two = HydraAttributor(net, fit_path="two_pass", random_state=0, verbose=0, **kw).fit(X, y)
    fused = HydraAttributor(net, random_state=0, verbose=0, **kw).fit(X, y)
    assert two.fit_path_ == "two_pass"
    for p, q in zip(two.net_.module_.parameters(), fused.net_.module_.parameters()):
        assert torch.equal(p, q)  # the same run
    return two, fused, two.attribute(Xt, yt), fused.attribute(Xt, yt)


def _close(C, C_ref, rtol=1e-10):
    scale = np.nanmax(np.abs(C_ref))
    assert scale > 0
    np.testing.assert_allclose(C, C_ref, rtol=0, atol=rtol * scale)


@pytest.fixture(params=["lazy", "deferred", "deferred-ring", "deferred-full"])
def store_kind(request, monkeypatch):
    """Each fused-fit test with both store fillers (``auto`` picks LazyStore for these
    small runs: DeferredStore's ring would outgrow the store), DeferredStore with the
    Linear weights' factors in a log (FactorLogStore, the default for in-memory stores),
    in its ring (the default for memmap), and as full rows."""
    from hydrattr._fused import FusedRecorder

    kind = request.param.split("-")[0]
    monkeypatch.setattr(FusedRecorder, "STORE_KIND", kind)
    monkeypatch.setattr(FusedRecorder, "FACTOR_LINEAR", request.param != "deferred-full")
    monkeypatch.setattr(FusedRecorder, "LOG_FACTORS", request.param == "deferred" and "always")
    return request.param


def _filler(store_kind, storage="dense"):
    """The filler class name a fused fit under ``store_kind`` uses."""
    if store_kind == "lazy":
        return "LazyStore"
    if store_kind == "deferred" and storage != "memmap":
        return "FactorLogStore"
    return "DeferredStore"


@pytest.mark.parametrize("kw", [
    dict(storage="dense"),
    dict(storage="memmap"),
    dict(storage="half"),
    dict(track=30),
    dict(last_epochs=2),
    dict(last_epochs="final_lr"),
], ids=["dense", "memmap", "half", "track", "last_epochs", "final_lr"])
def test_fused_equals_two_pass(store_kind, kw, tmp_path):
    X, y = _data()
    Xt, yt = _data(5, seed=1)
    if kw.get("storage") == "memmap":
        kw = dict(kw, store_dir=str(tmp_path))
    two, fused, C2, C = _both(_net(), X, y, Xt, yt, **kw)
    assert fused.fit_path_ == "fused" and fused.hooks_fallback_ is None
    assert fused._fit_filler == _filler(store_kind, kw.get("storage", "dense"))
    # both Linear layers of the MLP (6 -> 8 -> 3) held as factors in the log or ring
    assert fused._fit_factored == ([(0, 8, 6), (56, 3, 8)]
                                   if store_kind in ("deferred", "deferred-ring") else [])
    assert fused.trajectory_ is None and fused.store_.kind == two.store_.kind
    assert type(fused.store_).__name__ == (
        "FactoredStore" if _filler(store_kind, kw.get("storage", "dense")) == "FactorLogStore"
        else "SampleStore")
    _close(C, C2, rtol=2e-3 if kw.get("storage") == "half" else 1e-10)
    if "track" in kw:
        assert np.isnan(C).sum() == np.isnan(C2).sum() == (N - 30) * 5


@pytest.mark.parametrize("storage", ["dense", "half"])
def test_deferred_fill_folds_a_long_float32_run(storage):
    """A float32 run long enough (600 steps at momentum 0.9) that DeferredStore folds most
    terms before the end, picked by ``auto`` (its ring is smaller than the store here):
    the two-pass ``C`` on the same trajectory to float32 rounding of sums over hundreds
    of steps (1e-5 of the largest entry; float16 store: 2e-3, its resolution)."""
    from hydrattr._core.deferred import ring_rows

    n = 2400
    X, y = _data(n)
    Xt, yt = _data(5, seed=1)
    net = _net(module__dtype=torch.float32, max_epochs=4, batch_size=16, callbacks=None)
    assert ring_rows(MOM, 16, torch.float16 if storage == "half" else torch.float32) \
        <= 1.5 * n
    two, fused, C2, C = _both(net, X.astype(np.float32), y, Xt.astype(np.float32), yt,
                              storage=storage)
    # four epochs of a 6 -> 8 -> 3 MLP: its factors a row per epoch take more than its
    # blocks, so the factored ring holds them
    assert fused.fit_path_ == "fused" and fused._fit_filler == "DeferredStore"
    assert len(fused._fit_factored) == 2
    _close(C, C2, rtol=2e-3 if storage == "half" else 1e-5)


def test_fused_equals_naive_float64_recurrence(store_kind):
    """The textbook forward recurrence of test_hydra, on a fused fit's recorded run."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import test_hydra as th

    X, y = th._data()
    Xt, yt = th._data(5, seed=1)
    fused = HydraAttributor(th._net(), random_state=0, verbose=0).fit(X, y)
    ref = HydraAttributor(th._net(), storage="replay", random_state=0, verbose=0).fit(X, y)
    assert fused.fit_path_ == "fused"
    _close(fused.attribute(Xt, yt), th._naive_fast_C(ref, X, y, Xt, yt))


def test_fused_param_groups_nesterov_plateau(store_kind):
    X, y = _data(96)
    Xt, yt = _data(4, seed=2)
    net = _net(**groups_nesterov_plateau(max_epochs=5))
    two, fused, C2, C = _both(net, X, y, Xt, yt)
    assert fused.spec_.n_groups == 2 and fused.fit_path_ == "fused"
    _close(C, C2)


def test_fused_plain_sgd_and_sum_loss(store_kind):
    X, y = _data()
    Xt, yt = _data(4, seed=3)
    net = _net(optimizer__momentum=0.0, optimizer__dampening=0.0,
               criterion=nn.CrossEntropyLoss(reduction="sum"), lr=0.002)
    _, fused, C2, C = _both(net, X, y, Xt, yt)
    _close(C, C2)


@pytest.mark.parametrize("module__dropout,module__batchnorm,route", [
    (0.3, False, None), (0.0, True, "BatchNorm")])
def test_fused_with_dropout_and_batchnorm(store_kind, module__dropout, module__batchnorm, route):
    """Dropout: hooks on the real masks; BatchNorm: the Jacobian rows at each step."""
    X, y = _data()
    Xt, yt = _data(4, seed=4)
    net = _net(module__dropout=module__dropout, module__batchnorm=module__batchnorm)
    _, fused, C2, C = _both(net, X, y, Xt, yt)
    assert fused.fit_path_ == "fused"
    if route is None:
        assert fused.hooks_fallback_ is None
    else:
        assert route in fused.hooks_fallback_
    _close(C, C2)


def _wide_data(n, d, seed, n_test, second=5):
    """``n`` rows of ``d`` Gaussian features, three classes from two of them; test points
    near the first ``n_test`` rows."""
    rs = np.random.RandomState(seed)
    X = rs.randn(n, d)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, second] > 0.5)
    return X, y, X[:n_test] + 0.1, y[:n_test]


def _sgd16(module, **kw):
    """``module`` trained 2 epochs by SGD (lr 0.05, momentum 0.9) in batches of 16."""
    return NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss,
                               optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.9,
                               batch_size=16, max_epochs=2, train_split=None, verbose=0, **kw)


class _SmallConv(nn.Module):
    def __init__(self, tied=False):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.conv = nn.Conv2d(1, 3, 3, padding=1, **kw)
        self.fc = nn.Linear(3 * 4 * 4, K, **kw)
        self.unused = nn.Linear(2, 2, **kw)  # no gradient at all: zero contributions
        self.tied = tied

    def forward(self, x):
        h = torch.relu(self.conv(x.reshape(-1, 1, 4, 4))).flatten(1)
        out = self.fc(h)
        if self.tied:  # the layer's weight used outside its forward: hooks cannot see it
            out = out + 0.1 * nn.functional.linear(h, self.fc.weight)
        return out


@pytest.mark.parametrize("tied", [False, True])
def test_fused_conv_net_and_a_parameter_used_outside_its_layer(store_kind, tied):
    X, y, Xt, yt = _wide_data(64, 16, 5, n_test=3)
    net = _sgd16(_SmallConv, module__tied=tied, optimizer__weight_decay=1e-3)
    two, fused, C2, C = _both(net, X, y, Xt, yt)
    assert fused.fit_path_ == "fused"
    unused = slice(fused.spec_.n_params - 6, fused.spec_.n_params)
    assert fused.spec_.names[-2:] == ["unused.weight", "unused.bias"]
    assert float(fused.store_.data[:, unused].abs().max()) == 0.0
    if tied:
        assert "add up" in fused.hooks_fallback_
    else:
        assert fused.hooks_fallback_ is None
    _close(C, C2)


class _Again(nn.Module):
    """An MLP whose first layer runs on two positions and then again, every step."""

    def __init__(self):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.fc1 = nn.Linear(D, 8, **kw)
        self.fc2 = nn.Linear(8, K, **kw)

    def forward(self, x):
        h = self.fc1(torch.stack([x, -0.7 * x], 1)).sum(1) + 0.3 * self.fc1(0.5 * x)
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize("log", [True, False], ids=["log", "ring"])
def test_a_factored_layer_run_again_adds_its_extra_terms(monkeypatch, log):
    """A factored layer run on more than one position or more than once in a step (the
    layout is decided from the first step; here every Linear weight is factored however
    the step ran it): its further rank-one terms go to extra log entries (or ring rows)
    of the same slots, and C is the two-pass one."""
    from hydrattr._fused import FusedRecorder

    monkeypatch.setattr(FusedRecorder, "STORE_KIND", "deferred")
    monkeypatch.setattr(FusedRecorder, "LOG_FACTORS", log and "always")
    monkeypatch.setattr(PerSampleHooks, "factorable", lambda self: [
        (off, o, i) for off, (_, _, (o, i)) in sorted(self._seen.items())])
    X, y = _data()
    Xt, yt = _data(5, seed=1)
    net = _net(module=_Again)
    for key in ("module__n_features", "module__n_classes", "module__hidden",
                "module__activation", "module__dtype"):
        net.set_params(**{key: None})
        delattr(net, key)
    two, fused, C2, C = _both(net, X, y, Xt, yt)
    assert fused.fit_path_ == "fused" and fused.hooks_fallback_ is None
    assert fused._fit_factored == [(0, 8, D), (D * 8 + 8, K, 8)]
    _close(C, C2)


class _Wide(nn.Module):
    """40 -> 64 -> 3; with ``twice`` its first layer runs on two positions."""

    def __init__(self, twice=False):
        super().__init__()
        kw = dict(dtype=torch.float64)
        self.fc1 = nn.Linear(40, 64, **kw)
        self.fc2 = nn.Linear(64, K, **kw)
        self.twice = twice

    def forward(self, x):
        h = self.fc1(torch.stack([x, 0.5 * x], 1)).sum(1) if self.twice else self.fc1(x)
        return self.fc2(torch.tanh(h))


@pytest.mark.parametrize("twice", [False, True])
def test_auto_filler_is_sized_for_the_factored_ring(twice):
    """400 rows of a 2,819-parameter MLP at batch 16: DeferredStore's ring takes 3,232
    rows, more than 1.5 times the store with full rows but 8% of that with both Linear
    weights as factors, so ``auto`` picks it (before the factored ring: LazyStore). When
    the first step does not confirm the layout (fc1 on two positions: only fc2 is
    factored), the ring no longer fits and the filler becomes a LazyStore given the same
    steps. Either way C is the two-pass one."""
    X, y, Xt, yt = _wide_data(400, 40, 1, n_test=4, second=1)
    two, fused, C2, C = _both(_sgd16(_Wide, module__twice=twice), X, y, Xt, yt)
    assert fused.fit_path_ == "fused" and fused.hooks_fallback_ is None
    if twice:
        assert fused._fit_filler == "LazyStore"
    else:
        assert fused._fit_filler == "FactorLogStore"
        assert fused._fit_factored == [(0, 64, 40), (40 * 64 + 64, K, 64)]
    _close(C, C2)


def test_window_known_only_at_the_end_falls_back_to_two_pass():
    """final_lr with the rate changed mid-epoch: the window starts at that epoch's first
    step, already committed, so the fused store is refilled from the kept trajectory."""
    from torch.optim.lr_scheduler import MultiStepLR

    X, y = _data()
    Xt, yt = _data(4, seed=5)
    steps = int(np.ceil(N / BS))
    net = _net(callbacks=[("sched", LRScheduler(MultiStepLR, milestones=[2 * steps + 3],
                                                gamma=0.5, step_every="batch"))])
    _, fused, C2, C = _both(net, X, y, Xt, yt, last_epochs="final_lr")
    assert fused.fit_path_ == "two_pass" and fused.window_start_ == 2 * steps
    _close(C, C2)


def test_fused_training_is_bit_identical_to_plain_fit():
    X, y = _data()
    X32 = X.astype(np.float32)
    net = _net(module__dtype=torch.float32, module__dropout=0.2)
    att = HydraAttributor(net, random_state=7, verbose=0).fit(X32, y)
    assert att.fit_path_ == "fused" and att.hooks_fallback_ is None
    torch.manual_seed(7)
    plain = clone(net).fit(X32, y)
    for (n, p), (_, q) in zip(att.net_.module_.named_parameters(),
                              plain.module_.named_parameters()):
        assert torch.equal(p, q), n


def test_adam_takes_the_two_pass_route():
    X, y = _data(64)
    Xt, yt = _data(3, seed=6)
    net = NeuralNetClassifier(MLP, module__n_features=D, module__n_classes=K,
                              module__hidden=(8,), module__dtype=torch.float64,
                              criterion=nn.CrossEntropyLoss, optimizer=torch.optim.Adam,
                              lr=0.01, batch_size=BS, max_epochs=2, train_split=None,
                              verbose=0)
    two, fused, C2, C = _both(net, X, y, Xt, yt)
    assert fused.fit_path_ == "two_pass"
    _close(C, C2, rtol=1e-12)


def test_a_fitted_factored_store_pickles(monkeypatch):
    """A fit whose store keeps the Linear blocks as a factor log (FactoredStore) pickles
    and attributes bitwise as before, and equals the two-pass C."""
    import pickle

    from hydrattr._fused import FusedRecorder

    monkeypatch.setattr(FusedRecorder, "STORE_KIND", "deferred")
    monkeypatch.setattr(FusedRecorder, "LOG_FACTORS", "always")
    X, y = _data()
    Xt, yt = _data(5, seed=1)
    two, fused, C2, C = _both(_net(), X, y, Xt, yt)
    assert type(fused.store_).__name__ == "FactoredStore"
    again = pickle.loads(pickle.dumps(fused))
    np.testing.assert_array_equal(again.attribute(Xt, yt), C)
    _close(C, C2)
