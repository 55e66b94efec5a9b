"""hydrattr side by side with Captum, pyDVL and dattri: one script, one run.

The same MNIST subset, the same networks (``--models``: multinomial logistic regression
``lr``, a small ReLU MLP ``mlp`` and its tanh twin ``mlp_tanh``, all trained with SGD +
momentum + weight decay and a cosine learning-rate schedule; ``mlp_hard``, a 784-128-10
ReLU MLP at a constant lr 0.05 with momentum 0.9 and no weight decay, issue 31's harder
net; see ``PEER_MODELS`` in ``_common/nets.py``) and the same ground truth for every
method:

* correlation with leave-one-out on ``--n-loo`` sampled training points, against
  same-order LOO (replaying the recorded batches without the sample: what HYDRA
  differentiates) and from-scratch LOO (a fresh training run with the same seed on the
  data without the sample);
* linear datamodeling score (LDS) on ``--n-lds`` random half-subsets, each retrained
  from scratch with the same seed;
* mislabel-detection AUC with 10% flipped labels: every method is rerun on the noisy
  training set and a sample's score is its summed contribution to the (clean) test set;
* wall time (from raw data to ``C``, including every training run the method needs)
  and the peak RSS increase during the method, measured in the same run, with
  the time also given as a ratio to one plain training run timed in this run.

Peers are imported from a separate folder (``--peers-dir``, default
``benchmarks/_work/peers``, git-ignored), installed there with
``pip install --no-deps --target benchmarks/_work/peers captum==0.9.0 dattri==0.3.0
pydvl==0.10.0 pyDeprecate "zarr<3" "numcodecs<0.16" asciitree fasteners more-itertools
deprecated wrapt`` so they never touch the project environment. A peer that cannot
be imported or fails gets a row saying why.

Ensembles at equal cost: ``hydra-fast-ens``, ``hydra-exact-ens`` and
``hydra-lowrank-ens`` are ``hydrattr.EnsembleAttributor`` over ``--ens-models`` (default:
``--trak-models``) independently seeded runs of the HYDRA mode, the mean of their ``C``,
to set beside dattri's TRAK with as many models; ``hydrattr-if-arnoldi-ens`` is the same
over ``--ens-models-if`` (default: ``--ens-models``) runs of hydrattr's Arnoldi
influence functions.

Every score is converted to hydrattr's convention (``C[i, j] > 0``: sample ``i``
helped test point ``j``); the conversion used for each peer is recorded in the JSON.

Usage::

    nice python benchmarks/accuracy/bench_peers.py --quick          # 1,000 / 100, minutes
    nice python benchmarks/accuracy/bench_peers.py                  # 5,000 / 500 (long on CPU)

Writes ``benchmarks/results/bench_peers[_quick].{json,md}`` and scatter plots
``bench_peers[_quick]_scatter_{lr,mlp}.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parents[1]  # benchmarks/: the shared helpers in _common
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
from _common import (PEER_MODELS, PRESETS, RESULTS, WORK, PeakMemory, add_data_arg,  # noqa: E402
                     peer_net, peers_data, release_memory, save_results, test_losses)

# Published reference points (MNIST-10, 5,000 train / 500 test; dattri's benchmark,
# Deng et al., "dattri: A Library for Efficient Data Attribution", NeurIPS 2024 D&B).
REFERENCE = {
    ("lr", "loo"): {"IF": 0.87, "TracIn": 0.28, "TRAK-50": 0.78},
    ("lr", "lds"): {"IF": 0.80, "TracIn": 0.33, "TRAK-50": 0.68},
    ("mlp", "lds"): {"IF-CG": 0.26, "TRAK-50": 0.45},
    ("lr", "auc"): {"(all methods, best)": 0.98},
}


# --------------------------------------------------------------------------- utils
def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# --------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1,000 train / 100 test, 50 LOO points, 20 LDS subsets, 5 epochs, "
                        "TRAK-5, 300 s per method run")
    p.add_argument("--n-train", type=int)
    p.add_argument("--n-test", type=int)
    p.add_argument("--n-loo", type=int, help="training points with LOO ground truth (100)")
    p.add_argument("--n-lds", type=int, help="random half-subsets for LDS (50)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--models", default="lr,mlp")
    p.add_argument("--methods", default="all",
                   help="comma-separated method names (see --list) or 'all'")
    p.add_argument("--skip", default="", help="comma-separated method names to skip")
    p.add_argument("--list", action="store_true", help="list the methods and exit")
    p.add_argument("--trak-models", type=int, help="TRAK ensemble size (50; quick: 5)")
    p.add_argument("--ens-models", type=int,
                   help="members of the hydra-*-ens methods (EnsembleAttributor); "
                        "default: --trak-models, TRAK's cost in training runs")
    p.add_argument("--ens-models-if", type=int,
                   help="members of hydrattr-if-arnoldi-ens (default: --ens-models)")
    p.add_argument("--ens-models-exact", type=int,
                   help="members of hydra-exact-ens and hydra-lowrank-ens only (default: "
                        "--ens-models): an exact sweep costs far more than a training run, "
                        "so equal wall time to TRAK-k can mean fewer members")
    p.add_argument("--sweep-batch", default="auto",
                   help="test points (or low-rank directions) per adjoint sweep of the "
                        "exact-mode methods: an int, 'all' (one sweep) or 'auto' "
                        "(HydraAttributor's default test_batch_size, the default here). "
                        "The same C; only the time changes")
    p.add_argument("--no-noisy", action="store_true", help="skip the mislabel experiment")
    p.add_argument("--no-scratch-loo", action="store_true",
                   help="skip from-scratch LOO retraining")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--method-timeout", type=int, default=None,
                   help="seconds per method run before it is given up (0: none; "
                        "default 300 with --quick, else none)")
    p.add_argument("--stop-by", default=None, metavar="HH:MM",
                   help="UTC clock time by which every method must have ended: each "
                        "method's limit is cut to the time left, and a method that would "
                        "start with under a minute left is not run (its row says so)")
    p.add_argument("--peers-dir", default=str(WORK / "peers"))
    add_data_arg(p)
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--tag", default=None, help="output file stem (default bench_peers[_quick])")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="free text added to the markdown report")
    p.add_argument("--merge", default=None, metavar="TAG[,TAG...]",
                   help="no run: merge the saved results of these tags (same task, same "
                        "ground truth, e.g. methods run in parallel processes) into --tag")
    args = p.parse_args(argv)
    q = args.quick
    for name, value in PRESETS["peers_quick" if q else "peers"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.method_timeout is None:
        args.method_timeout = 300 if q else 0
    if args.ens_models is None:
        args.ens_models = args.trak_models
    if args.ens_models_exact is None:
        args.ens_models_exact = args.ens_models
    if args.ens_models_if is None:
        args.ens_models_if = args.ens_models
    if args.tag is None:
        args.tag = "bench_peers_quick" if q else "bench_peers"
    args.deadline = _deadline(args.stop_by) if args.stop_by else None
    return args


def _deadline(hhmm):
    """``time.time()`` of the next ``HH:MM`` UTC (today, or tomorrow if already past)."""
    import datetime as dt

    h, m = (int(v) for v in hhmm.split(":"))
    now = dt.datetime.now(dt.timezone.utc)
    t = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if t <= now:
        t += dt.timedelta(days=1)
    return t.timestamp()


class EpochSnapshots:
    """skorch callback keeping the module's state_dict and mean lr of every epoch."""

    def __new__(cls, *a, **k):
        from skorch.callbacks import Callback

        class _Snap(Callback):
            def initialize(self):
                self.states, self.lrs, self._lr = [], [], []
                return self

            def on_batch_end(self, net, training=False, **kw):
                if training:
                    self._lr.append(net.optimizer_.param_groups[0]["lr"])

            def on_epoch_end(self, net, **kw):
                self.states.append(copy.deepcopy(net.module_.state_dict()))
                self.lrs.append(float(np.mean(self._lr)) if self._lr else 0.0)
                self._lr = []

        return _Snap()


def make_net(kind, n_rows, args, extra_callbacks=()):
    return peer_net(kind, n_rows, args.epochs, extra_callbacks)


def fit_net(kind, X, y, args, seed=None, extra_callbacks=()):
    import torch

    net = make_net(kind, len(X), args, extra_callbacks)
    torch.manual_seed(args.seed if seed is None else seed)
    return net.fit(X, y)


# ------------------------------------------------------------------ ground truth
def same_order_loo(kind, X, y, Xt, yt, rows, args):
    """Same-order LOO: hydrattr's ``LeaveOneOutAttributor(order="same")``, each row's
    retraining in the recorded batch order without it."""
    from hydrattr.loo import LeaveOneOutAttributor

    loo = LeaveOneOutAttributor(make_net(kind, len(X), args), order="same",
                                track=np.asarray(rows), random_state=args.seed, verbose=0)
    loo.fit(X, y)
    C = loo.attribute(Xt, yt)
    return C[rows], "hydrattr.loo.LeaveOneOutAttributor(order='same')"


def scratch_loo(kind, X, y, Xt, yt, rows, base, args):
    """From-scratch LOO: LeaveOneOutAttributor(order="reshuffle") (a fresh skorch
    training with the same seed on the data without the row), else the same by hand."""
    try:
        from hydrattr.loo import LeaveOneOutAttributor
    except ImportError:
        LeaveOneOutAttributor = None
    if LeaveOneOutAttributor is not None:
        loo = LeaveOneOutAttributor(make_net(kind, len(X), args), order="reshuffle",
                                    track=np.asarray(rows), random_state=args.seed,
                                    verbose=0)
        loo.fit(X, y)
        return loo.attribute(Xt, yt)[rows], \
            "hydrattr.loo.LeaveOneOutAttributor(order='reshuffle')"
    masks = []
    for i in rows:
        m = np.ones(len(X), bool)
        m[i] = False
        masks.append(m)
    return (scratch_retrain(kind, X, y, Xt, yt, masks, args) - base,
            "skorch fit without the row, same torch seed")


def scratch_retrain(kind, X, y, Xt, yt, keep_masks, args):
    """Test losses after training from scratch (same seed) on each boolean mask."""
    out = []
    for m in keep_masks:
        net = fit_net(kind, X[m], y[m], args)
        out.append(test_losses(net.module_, Xt, yt))
    return np.array(out)


# ------------------------------------------------------------------------ methods
METHODS = {}


def method(name, family, needs=None):
    def deco(fn):
        METHODS[name] = dict(fn=fn, family=family, needs=needs)
        return fn
    return deco


class Ctx:
    """What a method gets: data, the trained baseline net, snapshots, args."""

    def __init__(self, kind, X, y, Xt, yt, args, net=None, snaps=None):
        self.kind, self.X, self.y, self.Xt, self.yt, self.args = kind, X, y, Xt, yt, args
        self.net, self.snaps = net, snaps

    def train(self):
        """The baseline training run a peer starts from (timed inside the method)."""
        snap = EpochSnapshots()
        net = fit_net(self.kind, self.X, self.y, self.args, extra_callbacks=[("snap", snap)])
        return net, snap

    @property
    def wd(self):
        return PEER_MODELS[self.kind]["weight_decay"]

    @property
    def damping(self):
        """Extra damping for the influence solvers: 1e-3 on the non-convex nets (the
        MLPs), none for logistic regression, whose weight decay already makes H PD."""
        return 0.0 if self.kind == "lr" else 1e-3


def _tensors(ctx):
    import torch

    return (torch.as_tensor(ctx.X), torch.as_tensor(ctx.y), torch.as_tensor(ctx.Xt),
            torch.as_tensor(ctx.yt))


@method("hydra-fast", "hydrattr")
def m_hydra_fast(ctx):
    from hydrattr import HydraAttributor

    a = HydraAttributor(make_net(ctx.kind, len(ctx.X), ctx.args), mode="fast",
                        random_state=ctx.args.seed, verbose=0).fit(ctx.X, ctx.y)
    return a.attribute(ctx.Xt, ctx.yt), "mode='fast', storage='dense' (float32 N x P store)"


def _sweep_batch(ctx):
    """Exact mode's ``test_batch_size`` (``--sweep-batch``: an int, ``all`` or ``auto``)
    and ``how(att, n, what)``, which says how many sweeps ``att`` made for ``n`` columns."""
    arg = str(ctx.args.sweep_batch)
    b = len(ctx.Xt) if arg == "all" else ("auto" if arg == "auto" else int(arg))

    def how(att, n, what="test points"):
        per = att._sweep_bs(att.spec_.n_params)
        k = -(-n // per)
        src = "test_batch_size='auto'" if b == "auto" else "--sweep-batch"
        return (f"one adjoint sweep for all {n} {what}" if k == 1 else
                f"{k} adjoint sweeps of at most {per} of the {n} {what} ({src})")
    return b, how


@method("hydra-exact", "hydrattr")
def m_hydra_exact(ctx):
    from hydrattr import HydraAttributor

    b, how = _sweep_batch(ctx)
    a = HydraAttributor(make_net(ctx.kind, len(ctx.X), ctx.args), mode="exact",
                        test_batch_size=b, random_state=ctx.args.seed,
                        verbose=0).fit(ctx.X, ctx.y)
    return a.attribute(ctx.Xt, ctx.yt), f"mode='exact', {how(a, len(ctx.Xt))}"


def _exact_last(share):
    """``hydra-exact-last<pct>``: exact mode over the last ``share`` of the epochs only
    (``last_epochs``): the exact derivative of the truncated weighting, one adjoint
    sweep of that window per block of test points."""
    def run(ctx):
        import math

        from hydrattr import HydraAttributor

        b, how = _sweep_batch(ctx)
        k = max(1, math.ceil(share * ctx.args.epochs))
        a = HydraAttributor(make_net(ctx.kind, len(ctx.X), ctx.args), mode="exact",
                            last_epochs=k, test_batch_size=b, random_state=ctx.args.seed,
                            verbose=0).fit(ctx.X, ctx.y)
        return a.attribute(ctx.Xt, ctx.yt), (f"mode='exact', last_epochs={k} of "
                                              f"{ctx.args.epochs}: {how(a, len(ctx.Xt))}")
    return run


for _pct in (25, 50):
    method(f"hydra-exact-last{_pct}", "hydrattr")(_exact_last(_pct / 100))


def _lowrank(rank, share=None):
    """``hydra-lowrank`` (``rank=0.9``: the directions that keep 90% of the unit-scaled
    test gradients' energy; bench_lowrank: 59 of 200 test points on the MLP, 121 of
    2,000) and ``hydra-lowrank-<k>`` (the ``k`` leading directions, one adjoint sweep
    whatever the number of test points; bench_lowrank, tanh MLP at 1,500 rows: Spearman
    with exact mode 0.66 at k=32, 0.82 at k=64, 0.87 for rank=0.9's 81 directions);
    ``-last<pct>``: over the last ``share`` of the epochs only (``last_epochs``)."""
    def run(ctx):
        import math

        from hydrattr import HydraAttributor

        b, how = _sweep_batch(ctx)
        k = None if share is None else max(1, math.ceil(share * ctx.args.epochs))
        a = HydraAttributor(make_net(ctx.kind, len(ctx.X), ctx.args), mode="exact",
                            rank=rank, last_epochs=k, test_batch_size=b,
                            random_state=ctx.args.seed, verbose=0).fit(ctx.X, ctx.y)
        C = a.attribute(ctx.Xt, ctx.yt)
        window = "" if k is None else f", last_epochs={k} of {ctx.args.epochs}"
        return C, (f"mode='exact', rank={rank}{window}: {how(a, a.rank_, 'directions')} "
                   f"for {len(ctx.Xt)} test points ({a.truncation_error_:.3f} of their "
                   f"unit-scaled energy left out)")
    return run


method("hydra-lowrank", "hydrattr")(_lowrank(0.9))
for _k in (32, 64, 128):
    method(f"hydra-lowrank-{_k}", "hydrattr")(_lowrank(_k))
method("hydra-lowrank-128-last50", "hydrattr")(_lowrank(128, 0.5))


def _hydra_ensemble(ctx, mode, **kw):
    """``EnsembleAttributor`` over ``--ens-models`` (exact mode: ``--ens-models-exact``)
    seeds of ``HydraAttributor(mode)``.

    Each member is a full HYDRA run (its own training, recorded); the members' seeds are
    drawn from ``--seed``, so the ensemble need not contain the baseline run. Returns
    ``(C, k, ens)``."""
    from hydrattr import EnsembleAttributor, HydraAttributor

    k = ctx.args.ens_models if mode == "fast" else ctx.args.ens_models_exact
    member = HydraAttributor(make_net(ctx.kind, len(ctx.X), ctx.args), mode=mode,
                             verbose=0, **kw)
    ens = EnsembleAttributor(member, n_estimators=k, random_state=ctx.args.seed)
    C = ens.fit(ctx.X, ctx.y).attribute(ctx.Xt, ctx.yt)
    return C, k, ens


@method("hydra-fast-ens", "hydrattr")
def m_hydra_fast_ens(ctx):
    # the members' N x P float32 stores live on disk (in the system's temporary
    # directory): k dense stores of the 100k-parameter MLP would take k x 2 GB of RAM
    C, k, _ = _hydra_ensemble(ctx, "fast", storage="memmap")
    return C, (f"EnsembleAttributor(HydraAttributor(mode='fast', storage='memmap'), "
               f"n_estimators={k}): mean C of {k} seeded runs (TRAK-{k}'s training cost)")


@method("hydra-exact-ens", "hydrattr")
def m_hydra_exact_ens(ctx):
    b, how = _sweep_batch(ctx)
    C, k, ens = _hydra_ensemble(ctx, "exact", test_batch_size=b)
    return C, (f"EnsembleAttributor(HydraAttributor(mode='exact'), n_estimators={k}): mean "
               f"C of {k} seeded runs, each member {how(ens.estimators_[0], len(ctx.Xt))}")


@method("hydra-lowrank-ens", "hydrattr")
def m_hydra_lowrank_ens(ctx):
    b, _ = _sweep_batch(ctx)
    C, k, ens = _hydra_ensemble(ctx, "exact", rank=0.9, test_batch_size=b)
    ranks = [m.rank_ for m in ens.estimators_]
    return C, (f"EnsembleAttributor(HydraAttributor(mode='exact', rank=0.9), "
               f"n_estimators={k}): mean C of {k} seeded runs, each swept on the "
               f"directions keeping 90% of its unit-scaled test-gradient energy (ranks "
               f"{ranks}, sweeps of at most "
               f"{ens.estimators_[0]._sweep_bs(ens.estimators_[0].spec_.n_params)})")


def _hydrattr_if(ctx, **kw):
    from hydrattr.influence import InfluenceFunctionAttributor

    a = InfluenceFunctionAttributor(make_net(ctx.kind, len(ctx.X), ctx.args),
                                    random_state=ctx.args.seed, verbose=0, **kw)
    a.fit(ctx.X, ctx.y)
    return a.attribute(ctx.Xt, ctx.yt)


@method("hydrattr-if-cg", "hydrattr")
def m_if_cg(ctx):
    kw = dict(solver="cg", damping=ctx.damping, cg_tol=1e-6,
              cg_maxiter=300, block_size=len(ctx.Xt))
    return _hydrattr_if(ctx, **kw), f"{kw} (weight decay is in H; damping only for the MLP)"


@method("hydrattr-if-lissa", "hydrattr")
def m_if_lissa(ctx):
    kw = dict(solver="lissa", damping=ctx.damping,
              lissa_scale=50.0, lissa_depth=2000 if not ctx.args.quick else 500,
              lissa_repeat=1, lissa_batch_size=256, block_size=len(ctx.Xt))
    return _hydrattr_if(ctx, **kw), str(kw)


def _arnoldi_kw(ctx):
    return dict(solver="arnoldi", damping=ctx.damping, arnoldi_rank=200, arnoldi_iter=400)


@method("hydrattr-if-arnoldi", "hydrattr")
def m_if_arnoldi(ctx):
    kw = _arnoldi_kw(ctx)
    return (_hydrattr_if(ctx, **kw),
            f"{kw} (pyDVL's rank and Krylov dimension; weight decay is in H)")


@method("hydrattr-if-arnoldi-ens", "hydrattr")
def m_if_arnoldi_ens(ctx):
    from hydrattr import EnsembleAttributor
    from hydrattr.influence import InfluenceFunctionAttributor

    k, kw = ctx.args.ens_models_if, _arnoldi_kw(ctx)
    member = InfluenceFunctionAttributor(make_net(ctx.kind, len(ctx.X), ctx.args),
                                         verbose=0, **kw)
    ens = EnsembleAttributor(member, n_estimators=k, random_state=ctx.args.seed)
    C = ens.fit(ctx.X, ctx.y).attribute(ctx.Xt, ctx.yt)
    return C, (f"EnsembleAttributor(InfluenceFunctionAttributor({kw}), n_estimators={k}): "
               f"mean C of {k} seeded runs (TRAK-{k}'s number of trained models)")


@method("captum-tracincp", "Captum 0.9.0")
def m_tracincp(ctx):
    import torch
    from captum.influence import TracInCP

    net, snap = ctx.train()
    module = net.module_
    keys = [f"epoch{e}" for e in range(len(snap.states))]
    table = dict(zip(keys, zip(snap.states, snap.lrs)))

    def load(model, key):
        state, lr = table[key]
        model.load_state_dict(state)
        return lr

    Xtr, ytr, Xte, yte = _tensors(ctx)
    tr = TracInCP(module, torch.utils.data.TensorDataset(Xtr, ytr), keys,
                  checkpoints_load_func=load, loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                  batch_size=500, sample_wise_grads_per_batch=True)
    scores = tr.influence((Xte, yte), show_progress=False)  # (n_test, n_train)
    return (scores.T.double().numpy(),
            f"all {len(keys)} epoch checkpoints weighted by their mean lr, all layers, "
            "exact per-sample gradients; sign: positive = proponent = helpful (as is)")


def _captum_if(ctx, cls, **kw):
    import torch

    net, _ = ctx.train()
    state = copy.deepcopy(net.module_.state_dict())
    Xtr, ytr, Xte, yte = _tensors(ctx)
    inf = cls(net.module_, torch.utils.data.TensorDataset(Xtr, ytr), "final",
              checkpoints_load_func=lambda m, k: (m.load_state_dict(state), 1.0)[1],
              loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=500,
              sample_wise_grads_per_batch=True, **kw)
    scores = inf.influence((Xte, yte), show_progress=False)
    return scores.T.double().numpy()


@method("captum-if-naive", "Captum 0.9.0")
def m_captum_naive(ctx):
    from captum.influence import NaiveInfluenceFunction

    if ctx.kind != "lr":
        raise RuntimeError("skipped: builds the explicit P x P Hessian (P = 50,890 for "
                           "the MLP: 10 GB); see captum-if-arnoldi")
    kw = dict(projection_dim=2000, hessian_reg=ctx.wd, hessian_inverse_tol=1e-8)
    return (_captum_if(ctx, NaiveInfluenceFunction, **kw),
            f"{kw}: explicit Hessian, top-2000 eigenpairs, reg = weight decay; "
            "sign: g_test' H^-1 g_train = effect of down-weighting = helpful (as is)")


@method("captum-if-arnoldi", "Captum 0.9.0")
def m_captum_arnoldi(ctx):
    from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

    kw = dict(projection_dim=100, arnoldi_dim=300, hessian_reg=ctx.wd, arnoldi_tol=1e-6,
              hessian_inverse_tol=1e-8)
    return (_captum_if(ctx, ArnoldiInfluenceFunction, **kw),
            f"{kw}; reg = weight decay; sign as captum-if-naive")


def _pydvl(ctx, cls, fit_batch=None, **kw):
    import torch
    from pydvl.influence import InfluenceMode

    net, _ = ctx.train()
    module = net.module_.eval()
    Xtr, ytr, Xte, yte = _tensors(ctx)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr),
                                         batch_size=fit_batch or len(Xtr))
    model = cls(module, torch.nn.functional.cross_entropy, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model.fit(loader)
        scores = model.influences(Xte, yte, Xtr, ytr, mode=InfluenceMode.Up)
    # pyDVL returns <H^-1 g_test, g_train> (Koh & Liang's "up" influence without the
    # minus sign), i.e. the effect of *removing* the sample: helpful > 0 as in hydrattr
    return scores.T.double().detach().numpy()


@method("pydvl-cg", "pyDVL 0.10.0")
def m_pydvl_cg(ctx):
    from pydvl.influence.torch import CgInfluence

    kw = dict(regularization=ctx.wd + ctx.damping, rtol=1e-6,
              atol=1e-8, maxiter=300, solve_simultaneously=True)
    return _pydvl(ctx, CgInfluence, **kw), f"{kw}; Hessian over the full training set"


@method("pydvl-lissa", "pyDVL 0.10.0")
def m_pydvl_lissa(ctx):
    from pydvl.influence.torch import LissaInfluence

    kw = dict(regularization=ctx.wd + ctx.damping,
              maxiter=2000 if not ctx.args.quick else 500, scale=50.0, dampen=0.0,
              rtol=1e-6)
    return _pydvl(ctx, LissaInfluence, fit_batch=256, **kw), f"{kw}, batches of 256"


@method("pydvl-arnoldi", "pyDVL 0.10.0")
def m_pydvl_arnoldi(ctx):
    from pydvl.influence.torch import ArnoldiInfluence

    kw = dict(regularization=ctx.wd + ctx.damping, rank=200,
              krylov_dimension=400, tol=1e-8)
    return _pydvl(ctx, ArnoldiInfluence, **kw), str(kw)


def _dattri_loaders(ctx):
    import torch

    Xtr, ytr, Xte, yte = _tensors(ctx)
    tr = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=500)
    te = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xte, yte), batch_size=500)
    return tr, te


@method("dattri-trak", "dattri 0.3.0")
def m_dattri_trak(ctx):
    import torch
    from dattri.algorithm import TRAKAttributor
    from dattri.task import AttributionTask

    k = ctx.args.trak_models
    nets = [ctx.train()[0]] + [fit_net(ctx.kind, ctx.X, ctx.y, ctx.args,
                                       seed=ctx.args.seed + 1000 + s) for s in range(k - 1)]
    model = nets[0].module_.eval()
    ckpts = [copy.deepcopy(n.module_.state_dict()) for n in nets]
    ce = torch.nn.CrossEntropyLoss()

    def f(params, data):  # TRAK's model output: the margin log(p / (1 - p))
        x, y = data
        logp = -ce(torch.func.functional_call(model, params, x.reshape(-1, 784)), y.reshape(-1))
        return logp - torch.log(1 - torch.exp(logp))

    def m(params, data):  # dattri 0.3 passes a parameter dict (no flatten_func)
        x, y = data
        return torch.exp(-ce(torch.func.functional_call(model, params, x.reshape(-1, 784)),
                             y.reshape(-1)))

    task = AttributionTask(loss_func=f, model=model, checkpoints=ckpts)
    # the projected features' Gram matrix is inverted without regularization, so the
    # projection must stay well below the number of training samples
    dim = min(2048 if ctx.kind != "lr" else 1024, len(ctx.X) // 2)
    proj = dict(proj_dim=dim, proj_max_batch_size=32,
                proj_seed=0, device="cpu", proj_type="normal")
    attr = TRAKAttributor(task, correct_probability_func=m, projector_kwargs=proj,
                          device="cpu", regularization=0.0)
    tr, te = _dattri_loaders(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr.cache(tr)
        scores = attr.attribute(te)
    return (scores.detach().double().numpy(),
            f"TRAK-{k}: {k} independently trained models (seeds differ), projection {proj}; "
            "sign: positive = raises the test margin = helpful (as is)")


def _dattri_if(ctx, cls, **kw):
    import torch
    from dattri.task import AttributionTask

    net, _ = ctx.train()
    model = net.module_.eval()
    ce = torch.nn.CrossEntropyLoss()

    def f(params, data):
        x, y = data
        return ce(torch.func.functional_call(model, params, x.reshape(-1, 784)), y.reshape(-1))

    task = AttributionTask(loss_func=f, model=model,
                           checkpoints=copy.deepcopy(model.state_dict()))
    attr = cls(task, device="cpu", **kw)
    tr, te = _dattri_loaders(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr.cache(tr)
        scores = attr.attribute(tr, te)
    # dattri's IF score is g_train' H^-1 g_test (positive: up-weighting lowers the test
    # loss), so positive = helpful as in hydrattr
    return scores.detach().double().numpy()


@method("dattri-if-explicit", "dattri 0.3.0")
def m_dattri_explicit(ctx):
    from dattri.algorithm import IFAttributorExplicit

    if ctx.kind != "lr":
        raise RuntimeError("skipped: explicit P x P Hessian (P = 50,890 for the MLP)")
    kw = dict(regularization=ctx.wd)
    return _dattri_if(ctx, IFAttributorExplicit, **kw), f"{kw}; explicit Hessian"


@method("dattri-if-cg", "dattri 0.3.0")
def m_dattri_cg(ctx):
    from dattri.algorithm import IFAttributorCG

    kw = dict(max_iter=100, tol=1e-7, regularization=ctx.wd + ctx.damping)
    return _dattri_if(ctx, IFAttributorCG, **kw), str(kw)


# ---------------------------------------------------------------------- running
def _run_in_child(name, ctx, conn):
    """Child process body: run one method, send (row, C) back through ``conn``."""
    info = METHODS[name]
    row = dict(method=name, library=info["family"], status="ok")
    C = None
    try:
        with PeakMemory() as pm:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                C, settings = info["fn"](ctx)
            row["time_s"] = time.perf_counter() - t0
        row["peak_mb"] = pm.delta_mb
        row["settings"] = settings
        C = np.asarray(C, dtype=np.float64)
        if C.shape != (len(ctx.X), len(ctx.Xt)):
            raise RuntimeError(f"returned shape {C.shape}, expected {(len(ctx.X), len(ctx.Xt))}")
        if not np.all(np.isfinite(C)):
            raise RuntimeError(f"{int((~np.isfinite(C)).sum())} non-finite scores")
    except ImportError as exc:
        row.update(status="not installed", reason=f"cannot import: {exc}")
        C = None
    except Exception as exc:  # a peer that fails gets a row saying why
        msg = str(exc).strip().splitlines()
        row.update(status="skipped" if msg and msg[0].startswith("skipped") else "failed",
                   reason=f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300])
        if row["status"] == "failed":
            row["traceback"] = traceback.format_exc()[-2000:]
        C = None
    conn.send((row, C))
    conn.close()


def run_method(name, ctx, args):
    """Run one method in a forked child process: its peak memory is its own, and a
    method that exceeds ``--method-timeout`` (or runs into ``--stop-by``) is killed (even
    inside a long C call)."""
    import multiprocessing as mp

    timeout = args.method_timeout or None
    by_deadline = False
    if args.deadline is not None:  # --stop-by: the time left caps the limit
        left = args.deadline - time.time()
        if left < 60:
            return dict(method=name, library=METHODS[name]["family"], status="not run",
                        reason=f"under a minute left before --stop-by {args.stop_by} UTC"), None
        if timeout is None or left < timeout:
            timeout, by_deadline = left, True
    mpc = mp.get_context("fork")
    recv, send = mpc.Pipe(duplex=False)
    proc = mpc.Process(target=_run_in_child, args=(name, ctx, send), daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    result = None
    if recv.poll(timeout):
        try:
            result = recv.recv()
        except EOFError:
            result = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is not None:
        return result
    row = dict(method=name, library=METHODS[name]["family"])
    if timeout is not None and time.perf_counter() - t0 >= timeout:
        row.update(status="timeout", reason=(
            f"stopped at --stop-by {args.stop_by} UTC after {timeout:.0f} s" if by_deadline
            else f"did not finish within {timeout} s (--method-timeout) on the shared CPU"))
    else:
        row.update(status="failed", reason=f"child process died (exit code {proc.exitcode})")
    return row, None


def evaluate(row, C, truth):
    from hydrattr.metrics import linear_datamodeling_score, loo_correlation

    rows = truth["loo_rows"]
    for key in ("loo_same", "loo_scratch"):
        if truth.get(key) is None:
            continue
        for meth in ("spearman", "pearson"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row[f"{key}_{meth}"] = float(loo_correlation(C[rows], truth[key], method=meth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row["lds"] = float(linear_datamodeling_score(C, truth["lds_masks"], truth["lds_losses"],
                                                     output="loss"))


def ground_truth(kind, d, args):
    rs = np.random.RandomState(args.seed + 3)
    n = len(d["X"])
    rows = np.sort(rs.choice(n, size=args.n_loo, replace=False))
    truth = dict(loo_rows=rows)
    t0 = time.perf_counter()
    truth["loo_same"], truth["loo_same_how"] = same_order_loo(
        kind, d["X"], d["y"], d["Xt"], d["yt"], rows, args)
    truth["time_loo_same_s"] = time.perf_counter() - t0
    log(f"  [{kind}] same-order LOO on {len(rows)} rows: {truth['time_loo_same_s']:.0f} s")
    base_net = fit_net(kind, d["X"], d["y"], args)
    base = test_losses(base_net.module_, d["Xt"], d["yt"])
    if not args.no_scratch_loo:
        t0 = time.perf_counter()
        truth["loo_scratch"], truth["loo_scratch_how"] = scratch_loo(
            kind, d["X"], d["y"], d["Xt"], d["yt"], rows, base, args)
        truth["time_loo_scratch_s"] = time.perf_counter() - t0
        log(f"  [{kind}] from-scratch LOO: {truth['time_loo_scratch_s']:.0f} s")
    t0 = time.perf_counter()
    masks = np.zeros((args.n_lds, n), bool)
    for s in range(args.n_lds):
        masks[s, rs.choice(n, size=n // 2, replace=False)] = True
    truth["lds_masks"] = masks
    truth["lds_losses"] = scratch_retrain(kind, d["X"], d["y"], d["Xt"], d["yt"], masks, args)
    truth["time_lds_s"] = time.perf_counter() - t0
    log(f"  [{kind}] LDS retrainings ({args.n_lds} half-subsets): {truth['time_lds_s']:.0f} s")
    # noise floor of from-scratch LOO: the same training with a different seed
    alt = fit_net(kind, d["X"], d["y"], args, seed=args.seed + 999)
    truth["seed_noise_rms"] = float(np.sqrt(np.mean(
        (test_losses(alt.module_, d["Xt"], d["yt"]) - base) ** 2)))
    truth["loo_same_rms"] = float(np.sqrt(np.mean(truth["loo_same"] ** 2)))
    truth["base_test_loss"] = float(base.mean())
    pred = base_net.predict(d["Xt"])
    truth["base_test_acc"] = float((pred == d["yt"]).mean())
    return truth


def scatter_plot(kind, results, loo, path):
    """Each method's mean score vs the same-order LOO change of the mean test loss
    (``loo``) on the LOO rows; the scores are the rows' ``scatter_pred``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    preds = {r["method"]: np.asarray(r["scatter_pred"]) for r in results
             if r.get("scatter_pred") is not None}
    names = list(preds)
    if not names:
        return
    loo = np.asarray(loo)
    ncol = min(4, len(names))
    nrow = int(np.ceil(len(names) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, name in zip(axes.ravel(), names):
        pred = preds[name]
        ax.scatter(loo, pred, s=10, alpha=0.7)
        r = np.corrcoef(loo, pred)[0, 1] if np.std(pred) > 0 else np.nan
        ax.set_title(f"{name}\nPearson {r:.2f}", fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
        ax.axvline(0, color="k", lw=0.5)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    fig.supxlabel("same-order LOO: change of the mean test loss", fontsize=9)
    fig.supylabel("method's score (mean over test points)", fontsize=9)
    fig.suptitle(f"MNIST {kind.upper()}: each method vs leave-one-out on "
                 f"{len(loo)} training points", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt(v, nd=2):
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    return f"{v:.{nd}f}"


def markdown(res):
    a = res["args"]
    lines = [f"# hydrattr vs peers on MNIST ({a['n_train']:,} train / {a['n_test']} test)", "",
             f"Command: `{res['command']}`  ",
             f"Machine: {res['machine']}; torch threads: {a['threads']}; "
             f"total wall time {res['total_s'] / 60:.1f} min.", "",
             "Correlations are averaged over test points (Spearman across the "
             f"{a['n_loo']} LOO training points; column `LOO same` = same-order replay "
             "without the sample, `LOO scratch` = retrained from scratch with the same seed). "
             f"LDS: Spearman over {a['n_lds']} random half-subsets, each retrained from "
             "scratch. AUC: mislabel detection at 10% flipped labels, score = summed "
             "contribution to the test set (low = suspect). Time: from raw data to C, "
             "including every training run the method needs (x = multiple of one plain "
             "training run timed in this run). Memory: peak RSS increase of the method's own "
             "process (each method runs in a forked child).",
             ""] + ([a["note"], ""] if a.get("note") else [])
    for kind, mres in res["models"].items():
        t = mres["truth"]
        lines += [f"## {kind.upper()} ({mres['n_params']:,} parameters, test accuracy "
                  f"{t['base_test_acc']:.3f}, one training run {mres['train_s']:.1f} s)", "",
                  f"Ground truth: same-order LOO {t['time_loo_same_s']:.0f} s "
                  f"(rms effect {t['loo_same_rms']:.2e}); "
                  + (f"from-scratch LOO {t['time_loo_scratch_s']:.0f} s; "
                     if "time_loo_scratch_s" in t else "")
                  + f"LDS retrainings {t['time_lds_s']:.0f} s. Seed-to-seed rms change of "
                  f"the test losses: {t['seed_noise_rms']:.2e} (the noise floor of "
                  "from-scratch retraining).", "",
                  "| method | library | LOO same | LOO scratch | LDS | mislabel AUC | time s | "
                  "x train | peak MB | notes |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mres["rows"]:
            if r["status"] != "ok":
                lines.append(f"| {r['method']} | {r['library']} | - | - | - | - | - | - | - | "
                             f"{r['status']}: {r.get('reason', '')} |".replace("\n", " "))
                continue
            lines.append(
                f"| {r['method']} | {r['library']} | {fmt(r.get('loo_same_spearman'))} | "
                f"{fmt(r.get('loo_scratch_spearman'))} | {fmt(r.get('lds'))} | "
                f"{fmt(r.get('mislabel_auc'))} | {fmt(r['time_s'], 1)} | "
                f"{fmt(r['time_s'] / r.get('train_s', mres['train_s']), 1)} | "
                f"{fmt(r['peak_mb'], 0)} | "
                f"{r.get('noisy_status', '')} |")
        refs = [(m, v) for (k, metric), d in REFERENCE.items() if k == kind
                for m, v in [(f"{metric.upper()} {n}", x) for n, x in d.items()]]
        if refs:
            lines += ["", "Published reference points (dattri benchmark, MNIST-10 5,000/500): "
                      + "; ".join(f"{m} ~{v:.2f}" for m, v in refs) + "."]
        lines += ["", f"![scatter]({Path(mres['scatter']).name})" if mres.get("scatter") else "",
                  ""]
    lines += ["## Settings", ""]
    for kind, mres in res["models"].items():
        for r in mres["rows"]:
            if r.get("settings"):
                lines.append(f"- {kind} / {r['method']}: {r['settings']}")
    return "\n".join(lines) + "\n"


def _save(res, out, tag):
    save_results(tag, res, markdown(res), out=out, indent=1)


# the module whose import a method's library needs (what --list checks)
_LIBRARY_MODULES = {"hydrattr": "hydrattr", "Captum": "captum.influence",
                    "pyDVL": "pydvl.influence.torch", "dattri": "dattri.algorithm"}

# what must agree for runs to share one table (--no-noisy only leaves the AUC column empty)
_SAME_TASK = ("n_train", "n_test", "n_loo", "n_lds", "epochs", "seed", "trak_models",
              "no_scratch_loo")


def merge_results(tags, out, tag, note=""):
    """One report from runs of the same task split over processes.

    Every run must have the same task settings and, per model, the same ground truth
    (the same-order LOO scatter values, reproduced bit for bit by deterministic CPU
    training). A method's first successful row wins; a method that never succeeded
    shows its last attempt. Rows follow the order of ``METHODS``.
    """
    runs = []
    for t in tags:
        f = out / f"{t}.json"
        if not f.is_file():
            raise SystemExit(f"--merge: no results file {f}")
        runs.append(json.loads(f.read_text()))
    base = runs[0]
    for t, r in zip(tags[1:], runs[1:]):
        diff = [k for k in _SAME_TASK if r["args"].get(k) != base["args"].get(k)]
        if diff:
            raise SystemExit(f"--merge: {t} differs from {tags[0]} in {diff}")
    order = {n: i for i, n in enumerate(METHODS)}
    res = dict(base, command=" + ".join(r["command"] for r in runs),
               total_s=sum(r.get("total_s", 0.0) for r in runs), merged_from=list(tags),
               models={})
    res["args"] = dict(base["args"], tag=tag, note=note or " ".join(dict.fromkeys(
        r["args"].get("note", "") for r in runs)).strip())
    kinds = list(dict.fromkeys(k for r in runs for k in r["models"]))
    for kind in kinds:
        parts = [(t, r["models"][kind]) for t, r in zip(tags, runs) if kind in r["models"]]
        t0, m0 = parts[0]
        for t, m in parts[1:]:
            if not np.allclose(m["truth"]["scatter_loo"], m0["truth"]["scatter_loo"],
                               rtol=1e-9, atol=1e-12):
                raise SystemExit(f"--merge: the {kind} ground truth of {t} differs from "
                                 f"{t0}'s: not the same task")
        best = {}
        for t, m in parts:
            for row in m["rows"]:
                # a row's cost is a multiple of the training run timed in its own run
                row.setdefault("train_s", m["train_s"])
                cur = best.get(row["method"])
                # a success wins; otherwise the later attempt (a rerun) is reported
                if cur is None or (cur["status"] != "ok" and row["status"] != "not run"):
                    best[row["method"]] = row
        rows = sorted(best.values(), key=lambda r: order.get(r["method"], len(order)))
        mres = dict(m0, rows=rows, partial=any(m.get("partial") for _, m in parts))
        scatter = out / f"{tag}_scatter_{kind}.png"
        scatter_plot(kind, rows, m0["truth"]["scatter_loo"], scatter)
        mres["scatter"] = scatter.name if scatter.exists() else None
        res["models"][kind] = mres
    _save(res, out, tag)
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        out = Path(args.out)
        merge_results([t for t in args.merge.split(",") if t], out, args.tag, args.note)
        print((out / f"{args.tag}.md").read_text())
        return 0
    sys.path.insert(0, str(ROOT))
    if Path(args.peers_dir).is_dir():
        sys.path.append(args.peers_dir)  # appended: the project's packages win
    if args.list:
        import importlib

        status = {}
        for fam, mod in _LIBRARY_MODULES.items():
            try:
                importlib.import_module(mod)
                status[fam] = "importable"
            except Exception as exc:  # noqa: BLE001 - report any import failure
                status[fam] = f"cannot import {mod}: {type(exc).__name__}: {exc}"[:120]
        for n, m in METHODS.items():
            fam = m["family"].split()[0]
            print(f"{n:22s} {m['family']:14s} {status.get(fam, '')}")
        return 0
    os.environ.setdefault("TQDM_DISABLE", "1")  # peers' progress bars
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    skipped = [n for n in filter(None, args.skip.split(",")) if n in names]
    unknown = [n for n in names + skipped if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; --list shows them")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    d = peers_data(args.n_train, args.n_test, args.seed, args.data_dir)
    log(f"data: {len(d['X'])} train / {len(d['Xt'])} test; methods: {names}")
    res = dict(command="python benchmarks/accuracy/bench_peers.py " + " ".join(sys.argv[1:] if argv is None else argv),
               args=vars(args), machine=f"{platform.machine()} {os.cpu_count()} CPUs, "
               f"{platform.python_version()}, torch {torch.__version__}",
               reference={f"{k}/{m}": v for (k, m), v in REFERENCE.items()}, models={})
    for kind in args.models.split(","):
        log(f"== model {kind}")
        fit_net(kind, d["X"][:256], d["y"][:256], args)  # warm-up (imports, caches)
        t0 = time.perf_counter()
        net = fit_net(kind, d["X"], d["y"], args)
        train_s = time.perf_counter() - t0
        n_params = sum(p.numel() for p in net.module_.parameters())
        truth = ground_truth(kind, d, args)
        mres = dict(train_s=train_s, n_params=n_params, rows=[],
                    truth={k: v for k, v in truth.items()
                           if not isinstance(v, np.ndarray)})
        mres["truth"]["loo_rows"] = truth["loo_rows"].tolist()
        mres["truth"]["scatter_loo"] = truth["loo_same"].mean(axis=1).tolist()
        for name in names:
            if name in skipped:
                mres["rows"].append(dict(method=name, library=METHODS[name]["family"],
                                         status="not run", reason="--skip " + name))
                continue
            ctx = Ctx(kind, d["X"], d["y"], d["Xt"], d["yt"], args)
            row, C = run_method(name, ctx, args)
            if C is not None:
                evaluate(row, C, truth)
                row["scatter_pred"] = C[truth["loo_rows"]].mean(axis=1).tolist()
                if not args.no_noisy:
                    nctx = Ctx(kind, d["X"], d["y_noisy"], d["Xt"], d["yt"], args)
                    nrow, Cn = run_method(name, nctx, args)
                    if Cn is not None:
                        from hydrattr.metrics import mislabel_detection_auc

                        row["mislabel_auc"] = mislabel_detection_auc(Cn.sum(axis=1),
                                                                     d["flipped"])
                        row["noisy_time_s"] = nrow["time_s"]
                    else:
                        row["noisy_status"] = f"noisy run {nrow['status']}: {nrow.get('reason')}"
            log(f"  [{kind}] {name}: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in row.items() if k not in ("traceback", "settings", "library")))
            mres["rows"].append(row)
            # partial results after every method, so a long run that is stopped keeps them
            res["models"][kind] = {**mres, "scatter": None, "partial": True}
            res["total_s"] = time.perf_counter() - t_start
            _save(res, out, args.tag)
            release_memory()
        scatter = out / f"{args.tag}_scatter_{kind}.png"
        scatter_plot(kind, mres["rows"], mres["truth"]["scatter_loo"], scatter)
        mres["scatter"] = scatter.name if scatter.exists() else None
        res["models"][kind] = mres
        res["total_s"] = time.perf_counter() - t_start
        _save(res, out, args.tag)
    res["total_s"] = time.perf_counter() - t_start
    _save(res, out, args.tag)
    print((out / f"{args.tag}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
