"""The bridge between skorch nets and the pure-torch core.

* :class:`RecordingDataset` wraps the dataset skorch trains on and notes which rows the
  data loader fetches, so every batch is known by row index whatever the sampler,
  shuffling or ``train_split`` (skorch's ``Subset`` maps back to original rows).
* :class:`TrajectoryRecorder` is a plain skorch callback: at ``on_batch_begin`` of every
  training batch it snapshots the parameters, the hyperparameters in the optimizer's
  ``param_groups`` (so LR schedulers are honoured step by step), the RNG state and the
  batch rows. Training itself is untouched: no extra random draws, no change to the loop.
* :func:`make_loss_fn` turns the fitted net into ``loss_fn(theta, x, y)``, per-sample
  losses computed by the net's own ``infer`` and ``get_loss`` (so skorch's NLLLoss
  log-probability handling and output squeezing apply), with parameters swapped in
  through ``torch.func.functional_call``.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from skorch.callbacks import Callback
from skorch.dataset import get_len
from torch.func import functional_call

from ._core.functional import ParamSpec
from ._core.trajectory import Trajectory

__all__ = ["RecordingDataset", "TrajectoryRecorder", "make_loss_fn", "param_spec",
           "module_flags", "module_mode", "per_sample_reduction"]

_SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class RecordingDataset(torch.utils.data.Dataset):
    """Delegate to ``dataset`` and remember every index fetched (single-process loading)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.fetched = []

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.fetched.append(int(i))
        return self.dataset[i]

    def take(self, n):
        """The last ``n`` fetched indices (the batch just loaded); clears the log."""
        if len(self.fetched) < n:
            raise RuntimeError(
                "hydrattr could not tell which rows formed a training batch. Batches must be "
                "loaded in the main process: set iterator_train__num_workers=0 on the net.")
        rows = self.fetched[-n:]
        self.fetched = []
        return rows


def param_spec(net):
    """:class:`ParamSpec` of the trainable parameters, in ``param_groups`` order."""
    names = {id(p): n for n, p in net.module_.named_parameters()}
    flat_names, shapes, group_sizes = [], [], []
    for g in net.optimizer_.param_groups:
        size = 0
        for p in g["params"]:
            if not p.requires_grad:
                continue
            if id(p) not in names:
                raise ValueError(
                    "net: the optimizer holds parameters that are not in net.module_; "
                    "hydrattr supports nets whose trainable parameters all live in module_.")
            flat_names.append(names[id(p)])
            shapes.append(p.shape)
            size += p.numel()
        group_sizes.append(size)
    return ParamSpec(flat_names, shapes, group_sizes)


def flat_params(net, spec):
    params = dict(net.module_.named_parameters())
    return spec.flatten({n: params[n].detach() for n in spec.names})


def check_optimizer(optimizer):
    """Raise a clear error for optimizers whose step hydrattr cannot differentiate."""
    name = type(optimizer).__name__
    if type(optimizer) not in _SUPPORTED:
        raise TypeError(
            f"net.optimizer: HydraAttributor supports torch.optim.SGD (with momentum, "
            f"dampening, Nesterov, weight decay, several param groups and any LR schedule) "
            f"and torch.optim.Adam / torch.optim.AdamW (betas, eps, coupled or decoupled "
            f"weight decay, bias correction); got {type(optimizer).__module__}.{name}.")
    for g in optimizer.param_groups:
        if g.get("maximize", False):
            raise ValueError(f"net.optimizer: {name} with maximize=True is not supported.")
        if g.get("amsgrad", False):
            raise ValueError(
                f"net.optimizer: {name} with amsgrad=True is not supported (the running "
                f"maximum of the second moment is not differentiable); use amsgrad=False.")


def _is_adam(optimizer):
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def optimizer_hyper_row(optimizer):
    """Per-group hyperparameters of the next step as used by the optimizer (one dict of lists).

    SGD: lr, momentum, dampening, weight_decay, nesterov, first (buffer not yet created).
    Adam/AdamW: lr, beta1, beta2, eps, weight_decay, decoupled (AdamW), step (the bias
    correction count of the coming step, i.e. after torch's increment).
    """
    adam = _is_adam(optimizer)
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "step") if adam else \
        ("lr", "momentum", "dampening", "weight_decay", "nesterov", "first")
    row = {k: [] for k in keys}
    for g in optimizer.param_groups:
        ps = [p for p in g["params"] if p.requires_grad]
        state = optimizer.state.get(ps[0], {}) if ps else {}
        if adam:
            b1, b2 = g["betas"]
            row["lr"].append(float(g["lr"]))
            row["beta1"].append(float(b1))
            row["beta2"].append(float(b2))
            row["eps"].append(float(g["eps"]))
            row["weight_decay"].append(float(g["weight_decay"]))
            row["decoupled"].append(bool(g.get("decoupled_weight_decay", False))
                                    or isinstance(optimizer, torch.optim.AdamW))
            step = state.get("step")
            row["step"].append(1.0 + (0.0 if step is None else float(step)))
        else:
            for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov"):
                row[k].append(float(g[k]) if k != "nesterov" else bool(g[k]))
            row["first"].append(state.get("momentum_buffer") is None)
    return row


def optimizer_state_vectors(optimizer, params):
    """Adam/AdamW: flat ``(exp_avg, exp_avg_sq)`` over ``params`` (zeros before the first
    step); None for optimizers whose step needs no recorded state (SGD)."""
    if not _is_adam(optimizer):
        return None
    out = []
    for key in ("exp_avg", "exp_avg_sq"):
        out.append(torch.cat([optimizer.state.get(p, {}).get(key, torch.zeros_like(p))
                              .detach().reshape(-1) for p in params]))
    return tuple(out)


def module_flags(module):
    """``(has_batchnorm, has_dropout)`` for modules that couple samples or draw masks."""
    bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())
    dr = any(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in module.modules())
    return bn, dr


@contextlib.contextmanager
def module_mode(module, training):
    """Set train/eval mode; in train mode BatchNorm stops updating running statistics.

    Train-mode outputs use batch statistics only, so turning off tracking changes no
    number while keeping replays from touching the trained net's buffers.
    """
    modes = {m: m.training for m in module.modules()}
    tracking = {}
    module.train(training)
    if training:
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                tracking[m] = m.track_running_stats
                m.track_running_stats = False
    try:
        yield
    finally:
        for m, tr in tracking.items():
            m.track_running_stats = tr
        for m, mode in modes.items():
            m.training = mode


def per_sample_reduction(net):
    """The criterion's reduction: 'mean' (weight 1/B per sample) or 'sum' (weight 1)."""
    crit = net.criterion_
    red = getattr(crit, "reduction", None)
    if red not in ("mean", "sum"):
        raise ValueError(
            f"net.criterion: hydrattr needs a torch loss with reduction 'mean' or 'sum' "
            f"(got {red!r}) so that each sample's weight in the batch loss is known.")
    if getattr(crit, "weight", None) is not None:
        raise ValueError("net.criterion: class-weighted losses are not supported (their "
                         "'mean' divides by the batch's total weight, not the batch size).")
    return red


class _NetLoss(torch.nn.Module):
    """Per-sample losses through the net's own ``infer``/``get_loss``."""

    def __init__(self, net):
        super().__init__()
        self.module = net.module_
        object.__setattr__(self, "_net", net)

    def forward(self, x, y):
        net = self._net
        crit = net.criterion_
        red = crit.reduction
        crit.reduction = "none"
        try:
            y_pred = net.infer(x)
            loss = net.get_loss(y_pred, y, X=x, training=self.training)
        finally:
            crit.reduction = red
        if loss.dim() != 1:
            loss = loss.reshape(loss.shape[0], -1).sum(dim=1)
        return loss


def make_loss_fn(net, spec):
    """``loss_fn(theta, x, y) -> (batch,)`` per-sample losses at flat parameters ``theta``."""
    wrapper = _NetLoss(net)

    def loss_fn(theta, x, y):
        params = {"module." + n: p for n, p in spec.unflatten(theta).items()}
        return functional_call(wrapper, params, (x, y), strict=False)

    return loss_fn


def make_data_fn(X, y, device):
    """``data_fn(rows) -> (x, y)`` tensors on ``device`` (X a tensor or a dict of tensors)."""
    from ._inputs import take_rows, to_device

    def data_fn(rows):
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return to_device(take_rows(X, rows), device), y[rows].to(device)

    return data_fn


class TrajectoryRecorder(Callback):
    """skorch callback that records what HYDRA replays; see the module docstring.

    Parameters
    ----------
    dataset : RecordingDataset
        The dataset given to ``net.fit``.
    record_rng : bool
        Store the RNG state per step (needed to replay dropout).
    storage, directory : see :class:`~hydrattr._core.trajectory.Trajectory`.
    """

    def __init__(self, dataset, record_rng=False, storage="memory", directory=None):
        self.dataset = dataset
        self.record_rng = record_rng
        self.storage = storage
        self.directory = directory

    def initialize(self):
        self.trajectory_ = None
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        check_optimizer(net.optimizer_)
        self.spec_ = param_spec(net)
        self.reduction_ = per_sample_reduction(net)
        dtype = next(net.module_.parameters()).dtype
        self.trajectory_ = Trajectory(self.spec_, len(self.dataset), storage=self.storage,
                                      directory=self.directory, dtype=dtype)
        # module buffers before the first step (BatchNorm running statistics), so that
        # replays can rebuild the running statistics along the trajectory
        self.trajectory_.buffers0 = {n: b.detach().to("cpu").clone()
                                     for n, b in net.module_.named_buffers()}
        self._params = [p for g in net.optimizer_.param_groups for p in g["params"]
                        if p.requires_grad]
        self.dataset.fetched = []

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        self.trajectory_.begin_epoch()

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if not training:
            return
        n = get_len(batch[0]) if isinstance(batch, (tuple, list)) else get_len(batch)
        rows = self.dataset.take(n)
        opt = net.optimizer_
        row = optimizer_hyper_row(opt)
        opt_state = optimizer_state_vectors(opt, self._params)
        theta = torch.cat([p.detach().reshape(-1) for p in self._params])
        rng = None
        if self.record_rng:
            cuda = None
            if theta.is_cuda:
                cuda = torch.cuda.get_rng_state(theta.device)
            rng = (torch.get_rng_state(), cuda)
        weight = 1.0 / n if self.reduction_ == "mean" else 1.0
        self.trajectory_.append(theta, rows, weight, row, rng, opt_state=opt_state)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        theta = torch.cat([p.detach().reshape(-1) for p in self._params])
        self.trajectory_.finish(theta)
        self.dataset.fetched = []
