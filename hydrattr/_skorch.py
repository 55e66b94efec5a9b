"""The bridge between skorch nets and the pure-torch core.

* :class:`RecordingDataset` wraps the dataset skorch trains on and notes which rows the
  data loader fetches, so every batch is known by row index whatever the sampler,
  shuffling or ``train_split`` (skorch's ``Subset`` maps back to original rows).
* :class:`TrajectoryRecorder` is a plain skorch callback: at ``on_batch_begin`` of every
  training batch it snapshots the parameters, the RNG state and the batch rows; just
  before ``optimizer.step()`` the hyperparameters in the optimizer's ``param_groups`` (so
  LR schedulers are honoured step by step); the step is committed only once the
  optimizer has applied it. Training itself is untouched: no extra random draws, no
  change to the loop.
* :func:`watch_interrupts` notes a Ctrl-C during ``fit``, which skorch catches
  (``KeyboardInterrupt`` ends training early and ``fit`` returns);
  :func:`check_targets` checks targets against the module's output and criterion.
* :func:`make_loss_fn` turns the fitted net into ``loss_fn(theta, x, y)``, per-sample
  losses computed by the net's own ``infer`` and ``get_loss`` (so skorch's NLLLoss
  log-probability handling and output squeezing apply), with parameters swapped in
  through ``torch.func.functional_call``.
* :func:`record_fit` is the one entry point that clones a net, trains the clone with
  skorch's ``fit`` while a recorder watches, and hands back a :class:`Recording`;
  :func:`probe_net` and :func:`trained_clone` are the other two ways hydrattr makes nets.

Only this module imports skorch.
"""
from __future__ import annotations

import contextlib
import copy
import numbers
import signal
import threading

import numpy as np
import torch
from sklearn.base import clone
from sklearn.utils import check_random_state
from skorch import NeuralNet
from skorch.callbacks import Callback, LRScheduler
from skorch.dataset import get_len
from skorch.classifier import NeuralNetClassifier
from torch.func import functional_call

from ._core.checkpoint import CheckpointedTrajectory, ModuleReplayer, capture_state
from ._core.functional import ParamSpec
from ._core.trajectory import Trajectory

__all__ = ["NeuralNet", "RecordingDataset", "TrajectoryRecorder", "make_loss_fn", "param_spec",
           "module_flags", "module_mode", "per_sample_reduction", "watch_interrupts",
           "check_targets", "is_net", "check_net", "probe_net", "record_fit", "Recording",
           "trained_clone", "is_adam", "torch_seed", "fit_recording_dynamics", "classifier",
           "training_copy", "step_replayer"]

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


def is_adam(optimizer):
    """Whether ``optimizer`` is Adam or AdamW (per-coordinate steps) rather than SGD."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def optimizer_hyper_row(optimizer):
    """Per-group hyperparameters of the next step as used by the optimizer (one dict of lists).

    SGD: lr, momentum, dampening, weight_decay, nesterov, first (buffer not yet created).
    Adam/AdamW: lr, beta1, beta2, eps, weight_decay, decoupled (AdamW), step (the bias
    correction count of the coming step, i.e. after torch's increment).
    """
    adam = is_adam(optimizer)
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
    if not is_adam(optimizer):
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


@contextlib.contextmanager
def watch_interrupts():
    """Note a Ctrl-C (SIGINT) during the block; yields a list that gets an entry per signal.

    skorch's ``fit`` catches ``KeyboardInterrupt`` (its way to stop training early, also
    used by ``EarlyStopping``), so a Ctrl-C would otherwise pass unnoticed. The handler
    raises ``KeyboardInterrupt`` exactly like Python's default one. Only installed in the
    main thread and when the default handler is in place (otherwise nothing is noted).
    """
    seen = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield seen
        return

    def handler(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_ELEMENTWISE = (torch.nn.MSELoss, torch.nn.L1Loss, torch.nn.SmoothL1Loss, torch.nn.HuberLoss,
                torch.nn.BCELoss, torch.nn.BCEWithLogitsLoss, torch.nn.SoftMarginLoss,
                torch.nn.PoissonNLLLoss)  # losses that pair output and target entry by entry


def _class_targets(crit):
    return isinstance(crit, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))


def check_targets(net, x, y, name):
    """Check the targets ``y`` (numpy, all rows) against ``net``'s module and criterion.

    ``x`` holds a few input rows (``y[:len(x)]`` are their targets); the module's output
    on them gives the number of classes and the output shape. Raises ``ValueError``
    naming ``name`` for labels the criterion cannot take (CrossEntropyLoss, NLLLoss) or
    shapes it would broadcast (torch's elementwise losses; custom criteria are trusted);
    returns a list of warnings (a criterion that does not match the module's output).
    """
    crit = net.criterion_
    cname = type(crit).__name__
    if y.dtype.kind not in "iubf":
        what = "integer class indices" if _class_targets(crit) else "numbers"
        raise ValueError(
            f"Unknown label type: {name} must hold {what} for net.criterion={cname}, got "
            f"dtype {y.dtype}"
            + (" (encode labels with sklearn.preprocessing.LabelEncoder)."
               if y.dtype.kind in "OUS" else "."))
    with torch.no_grad(), module_mode(net.module_, training=False):
        out = net.infer(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    out = out.detach().cpu()
    k = len(out)
    warns = []
    if _class_targets(crit):
        n_classes = out.shape[1] if out.dim() >= 2 else None
        soft = (isinstance(crit, torch.nn.CrossEntropyLoss) and y.ndim == 2
                and y.dtype.kind == "f" and y.shape[1] == n_classes)
        if not soft:
            if y.ndim != 1:
                raise ValueError(
                    f"{name} must have shape (n_samples,) with one class index per row for "
                    f"net.criterion={cname}, got shape {y.shape}.")
            if y.dtype.kind == "f" and not np.all(y == np.round(y)):
                raise ValueError(
                    f"{name} must hold integer class indices for net.criterion={cname}, "
                    f"got non-integral floats (e.g. {y[y != np.round(y)][0]!r}).")
            if n_classes is not None and len(y) and (y.min() < 0 or y.max() >= n_classes):
                raise ValueError(
                    f"{name} holds class labels outside [0, {n_classes}) (min {y.min()}, max "
                    f"{y.max()}), but the module outputs {n_classes} classes: net.criterion="
                    f"{cname} needs labels 0..{n_classes - 1}.")
        if isinstance(crit, torch.nn.NLLLoss) and out.dim() == 2 and k:
            tol = 1e-3
            if isinstance(net, NeuralNetClassifier):  # skorch feeds log(output) to NLLLoss
                ok = bool((out >= -tol).all() and (out <= 1 + tol).all()
                          and ((out.sum(1) - 1).abs() <= tol).all())
                what = ("NeuralNetClassifier takes the log of the module's output for "
                        "NLLLoss, so the module must return class probabilities (softmax)")
            else:
                ok = bool((out <= tol).all()
                          and (torch.logsumexp(out.double(), 1).abs() <= tol).all())
                what = "NLLLoss needs log-probabilities (log_softmax) from the module"
            if not ok:
                warns.append(
                    f"net.criterion=NLLLoss does not match the module's output: {what}, "
                    f"but on the first {k} training rows it returned values in "
                    f"[{float(out.min()):.3g}, {float(out.max()):.3g}]. A module that returns "
                    f"logits needs criterion=torch.nn.CrossEntropyLoss; otherwise training "
                    f"optimises a meaningless loss.")
    elif k >= 2 and isinstance(crit, _ELEMENTWISE):
        yk = torch.as_tensor(np.asarray(y[:k]))
        try:
            shape = tuple(torch.broadcast_shapes(out.shape, yk.shape))
        except RuntimeError:
            shape = None
        if shape != tuple(out.shape):
            target = "(n_samples" + "".join(f", {d}" for d in out.shape[1:]) + ")"
            raise ValueError(
                f"{name} has shape {y.shape}, but the module's output has shape {target}: "
                f"net.criterion={cname} would "
                + ("not accept them" if shape is None else
                   "broadcast them against each other (every output paired with every "
                   "target)")
                + f". Pass {name} with shape {target}, e.g. {name}.reshape"
                f"{(-1,) + tuple(out.shape[1:])}.")
    return warns


class TrajectoryRecorder(Callback):
    """skorch callback that records what HYDRA replays; see the module docstring.

    A step enters the trajectory only once the optimizer has applied it: the batch's
    parameters, rows and RNG state are noted at ``on_batch_begin``, the hyperparameters
    and optimizer state just before ``optimizer.step()`` (a pre-step hook), and the step is
    committed by a post-step hook (skorch computes the gradient in the closure it passes
    to ``optimizer.step``, so only then is the gradient the update used known). A batch cut short (Ctrl-C, which skorch catches to end
    training early) therefore leaves no step behind (``interrupted_``). The hooks also
    watch for anything that changes the update without being differentiated: a gradient
    altered after backpropagation (gradient clipping), parameters changed outside an
    optimizer step (weight averaging, restoring a checkpoint) and non-finite losses;
    :meth:`problems` describes them.

    Parameters
    ----------
    dataset : RecordingDataset
        The dataset given to ``net.fit``.
    record_rng : bool
        Store the RNG state per step (needed to replay dropout).
    storage, directory : see :class:`~hydrattr._core.trajectory.Trajectory`;
        ``storage="checkpoint"`` records a
        :class:`~hydrattr._core.checkpoint.CheckpointedTrajectory` instead (the full
        training state every ``checkpoint_every`` steps; ``"auto"``: about the square
        root of ``max_epochs`` times the batches of an epoch).
    """

    def __init__(self, dataset, record_rng=False, storage="memory", directory=None,
                 checkpoint_every="auto"):
        self.dataset = dataset
        self.record_rng = record_rng
        self.storage = storage
        self.directory = directory
        self.checkpoint_every = checkpoint_every

    def initialize(self):
        self.trajectory_ = None
        return self

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        check_optimizer(net.optimizer_)
        self.spec_ = param_spec(net)
        self.reduction_ = per_sample_reduction(net)
        dtype = next(net.module_.parameters()).dtype
        if self.storage == "checkpoint":
            self.trajectory_ = CheckpointedTrajectory(self.spec_, len(self.dataset),
                                                      every=self.checkpoint_every, dtype=dtype)
        else:
            self.trajectory_ = Trajectory(self.spec_, len(self.dataset), storage=self.storage,
                                          directory=self.directory, dtype=dtype)
        # module buffers before the first step (BatchNorm running statistics), so that
        # replays can rebuild the running statistics along the trajectory
        self.trajectory_.buffers0 = {n: b.detach().to("cpu").clone()
                                     for n, b in net.module_.named_buffers()}
        self._params = [p for g in net.optimizer_.param_groups for p in g["params"]
                        if p.requires_grad]
        self.dataset.fetched = []
        self._pending = None  # the batch under way: (theta, rows, weight, rng)
        self._after = None  # the parameters right after the last applied step
        self._raw = [None] * len(self._params)  # gradients as backpropagated
        self.last_grad_ = None  # the gradient the last applied step used (flat)
        self.interrupted_ = False
        self.issues_ = {}  # kind -> (number of steps, first step)
        opt = net.optimizer_
        self._hooks = [opt.register_step_pre_hook(self._before_step),
                       opt.register_step_post_hook(self._after_step)]
        for k, p in enumerate(self._params):
            self._hooks.append(p.register_post_accumulate_grad_hook(
                lambda p, k=k: self._raw.__setitem__(k, p.grad.detach().clone())))

    def _note(self, kind, step=None):
        step = len(self.trajectory_) if step is None else step
        count, first = self.issues_.get(kind, (0, step))
        self.issues_[kind] = (count + 1, first)

    def _theta(self):
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def on_epoch_begin(self, net, dataset_train=None, dataset_valid=None, **kwargs):
        traj = self.trajectory_
        if self.storage == "checkpoint" and traj.planned_steps is None:
            traj.plan(net.max_epochs * self._batches_per_epoch(net, dataset_train))
        traj.begin_epoch()

    def _batches_per_epoch(self, net, dataset_train):
        """The training batches of one epoch, read off skorch's own iterator (whose
        construction and length draw no random numbers)."""
        try:
            with torch.random.fork_rng(devices=[]):
                return max(1, len(net.get_iterator(dataset_train, training=True)))
        except TypeError:
            if self.checkpoint_every != "auto":
                return 1  # the spacing is given: the plan only records the length
            raise ValueError(
                "trajectory='checkpoint' with checkpoint_every='auto' needs the number of "
                "training batches per epoch, but the training iterator has no length; pass "
                "checkpoint_every as an int.") from None

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if not training:
            return
        n = get_len(batch[0]) if isinstance(batch, (tuple, list)) else get_len(batch)
        rows = self.dataset.take(n)
        theta = self._theta()
        if self._after is not None and not torch.equal(theta, self._after):
            self._note("params")
        rng = None
        if self.record_rng:
            cuda = None
            if theta.is_cuda:
                cuda = torch.cuda.get_rng_state(theta.device)
            rng = (torch.get_rng_state(), cuda)
        weight = 1.0 / n if self.reduction_ == "mean" else 1.0
        self._pending = (theta, rows, weight, rng)  # (_theta() is a fresh tensor)
        # a checkpoint's state besides the parameters, before the forward pass updates
        # the module buffers (kept only once the step is applied)
        self._pending_state = None
        if self.storage == "checkpoint" and self.trajectory_.wants(len(self.trajectory_)):
            self._pending_state = capture_state(net.module_, net.optimizer_)
        self._raw = [None] * len(self._params)

    def _before_step(self, optimizer, args, kwargs):
        if self._pending is None:
            raise RuntimeError("hydrattr: net.optimizer_.step() ran outside a training batch; "
                               "hydrattr can only record steps taken by skorch's fit loop.")
        # hyperparameters and optimizer state as the step uses them (after any callback)
        self._pending += (optimizer_hyper_row(optimizer),
                          optimizer_state_vectors(optimizer, self._params))

    def _after_step(self, optimizer, args, kwargs):
        # skorch computes the gradient in the closure it passes to optimizer.step(), so
        # the gradient the update used (clipped or not) is known only now
        used = [p.grad for p in self._params]
        if any(r is not None and not torch.equal(g, r) for g, r in zip(used, self._raw)):
            self._note("grad")
        self.last_grad_ = torch.cat([torch.zeros_like(p).reshape(-1) if g is None
                                     else g.detach().reshape(-1)
                                     for p, g in zip(self._params, used)])
        theta, rows, weight, rng, row, opt_state = self._pending
        extra = {} if self.storage != "checkpoint" else {"state": self._pending_state}
        self.trajectory_.append(theta, rows, weight, row, rng, opt_state=opt_state, **extra)
        self._pending = self._pending_state = None
        self._after = self._theta()

    def on_batch_end(self, net, batch=None, training=False, **kwargs):
        loss = kwargs.get("loss")
        if training and loss is not None and not bool(torch.isfinite(loss).all()):
            self._note("loss", step=len(self.trajectory_) - 1)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        for h in self._hooks:
            h.remove()
        theta = self._theta()
        if self._pending is not None:
            # a batch began and its step was never completed: skorch caught a
            # KeyboardInterrupt there. Nothing was recorded for it; the parameters must
            # still be those the batch began with.
            self.interrupted_ = True
            if not torch.equal(theta, self._pending[0]):
                self._note("partial")
            self._pending = None
        elif self._after is not None and not torch.equal(theta, self._after):
            self._note("params")
        self.trajectory_.finish(theta)
        self.dataset.fetched = []
        self._after = self._raw = None

    def problems(self, net):
        """Messages for what makes the recorded trajectory differ from the real update.

        One string per kind of problem (empty list: the record is faithful), naming the
        net's own callbacks that may be the cause.
        """
        defaults = {name for name, _ in net.get_default_callbacks()}
        own = [(name, cb) for name, cb in getattr(net, "callbacks_", [])
               if name not in defaults and cb is not self]

        def suspects(*hooks):
            names = [f"{name} ({type(cb).__name__})" for name, cb in own
                     if any(getattr(type(cb), h, None) is not getattr(Callback, h)
                            for h in hooks)]
            return ", ".join(names) if names else "none of the net's callbacks"

        steps = len(self.trajectory_)
        out = []
        if "grad" in self.issues_:
            count, first = self.issues_["grad"]
            out.append(
                f"net.callbacks: the gradient was changed after backpropagation, before "
                f"the optimizer step, in {count} of {steps} steps (first at step {first}); "
                f"suspects: {suspects('on_grad_computed')}. hydrattr differentiates the "
                f"update of the gradient of the loss, so gradient clipping "
                f"(GradientNormClipping) and other gradient edits would give a wrong C. "
                f"Remove that callback (e.g. lower net.lr instead of clipping).")
        if "params" in self.issues_:
            count, first = self.issues_["params"]
            out.append(
                f"net.callbacks: the parameters were changed outside an optimizer step "
                f"{count} time(s) (first after {first} steps); suspects: "
                f"{suspects('on_batch_end', 'on_epoch_end', 'on_epoch_begin', 'on_train_end', 'on_batch_begin')}. "
                f"hydrattr attributes the recorded optimizer steps only, so callbacks "
                f"that restore or edit weights (e.g. EarlyStopping(load_best=True), "
                f"Checkpoint loading, weight averaging) are not supported.")
        if "partial" in self.issues_:
            out.append(
                "training was interrupted inside an optimizer step, which left the "
                "parameters partly updated; no trajectory describes them. Fit again.")
        return out

    def first_nonfinite_loss(self):
        """Index of the first step whose training loss was not finite (None: all finite)."""
        return self.issues_["loss"][1] if "loss" in self.issues_ else None


# -- training dynamics: each row's margin in the real training forward passes ------------
def log_probs_of(net, y_pred):
    """Log-probabilities from a training batch's module output, as the criterion reads it:
    log-softmax of logits for ``CrossEntropyLoss``, the log of the probabilities skorch's
    classifier feeds ``NLLLoss``."""
    crit = net.criterion_
    y_pred = y_pred[0] if isinstance(y_pred, (tuple, list)) else y_pred
    y_pred = y_pred.detach().float()
    if y_pred.dim() != 2:
        raise ValueError(f"net.module: training dynamics need a (batch, n_classes) output, "
                         f"got shape {tuple(y_pred.shape)}.")
    if isinstance(crit, torch.nn.CrossEntropyLoss):
        return torch.log_softmax(y_pred, dim=1)
    if isinstance(crit, torch.nn.NLLLoss):
        return torch.log(y_pred.clamp_min(torch.finfo(y_pred.dtype).tiny))
    raise ValueError(f"net.criterion: training dynamics need CrossEntropyLoss (logits) or "
                     f"NLLLoss (probabilities), got {type(crit).__name__}.")


class DynamicsRecorder(Callback):
    """Accumulate each training row's margin and probabilities at every step it enters.

    Reads the module output skorch passes to ``on_batch_end`` (the training forward pass
    itself, BatchNorm and dropout included), so it costs no extra forward pass. Rows are
    known from the :class:`RecordingDataset` given to ``fit``: each batch's indices are
    taken off its log (so no :class:`TrajectoryRecorder` may watch the same run).
    """

    def __init__(self, labels):
        self.labels = labels

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        if not isinstance(X, RecordingDataset):
            raise RuntimeError("DynamicsRecorder needs the RecordingDataset given to fit.")
        self._data = X
        self._labels = np.asarray(self.labels, dtype=np.int64)
        self._margins, self._counts, self._probs = [], [], None
        self._rows = None

    def on_epoch_begin(self, net, **kwargs):
        n = len(self._labels)
        self._margins.append(np.zeros(n))
        self._counts.append(np.zeros(n, dtype=np.int64))

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if not training:
            return
        self._rows = np.asarray(self._data.take(get_len(batch[0])), dtype=np.int64)

    def on_batch_end(self, net, batch=None, training=False, y_pred=None, **kwargs):
        if not training or self._rows is None:
            return
        from .label_issues import margins

        lp = log_probs_of(net, y_pred).cpu().numpy().astype(np.float64)
        rows, self._rows = self._rows, None
        if self._probs is None:
            self._probs = np.zeros((len(self._labels), lp.shape[1]))
        np.add.at(self._margins[-1], rows, margins(lp, self._labels[rows]))
        np.add.at(self._counts[-1], rows, 1)
        np.add.at(self._probs, rows, np.exp(lp))

    def dynamics(self):
        """The accumulated :class:`~hydrattr.label_issues.TrainingDynamics`."""
        from .label_issues import TrainingDynamics

        n = len(self._labels)
        k = 0 if self._probs is None else self._probs.shape[1]
        return TrainingDynamics(
            margin_sum=np.array(self._margins).reshape(-1, n),
            count=np.array(self._counts, dtype=np.int64).reshape(-1, n),
            prob_sum=self._probs if self._probs is not None else np.zeros((n, k)))


# -- making nets: probe, record, copy ------------------------------------------------------
def torch_seed(random_state):
    """The int torch is seeded with for ``random_state`` (None: torch is not seeded); a
    ``RandomState`` instance draws it."""
    if random_state is None:
        return None
    if isinstance(random_state, numbers.Integral):
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def is_net(obj):
    """Whether ``obj`` is a skorch ``NeuralNet`` (e.g. ``NeuralNetClassifier``)."""
    return isinstance(obj, NeuralNet)


def check_net(net):
    """Raise ``TypeError`` unless ``net`` is a skorch ``NeuralNet``."""
    if not is_net(net):
        raise TypeError(f"net must be a skorch NeuralNet (e.g. NeuralNetClassifier), "
                        f"got {type(net).__name__}.")


def classifier(module, schedule=None, **params):
    """``NeuralNetClassifier(module, **params)``; ``schedule=(scheduler_class, kwargs)``
    adds that learning-rate schedule as an ``LRScheduler`` callback (the cli's nets)."""
    if schedule is not None:
        policy, kwargs = schedule
        params["callbacks"] = list(params.get("callbacks") or []) + [
            ("lr", LRScheduler(policy, **kwargs))]
    return NeuralNetClassifier(module, **params)


def probe_net(net):
    """An initialized clone of ``net``, made without drawing from torch's RNG (to read
    the parameter dtype, the layers, or check targets before training)."""
    with torch.random.fork_rng():
        return clone(net).initialize()


def trained_clone(net, trained, drop_schedulers=False):
    """An initialized clone of ``net`` (no recorder) holding the module and optimizer
    state of the fitted ``trained``; ``drop_schedulers`` leaves out its
    ``LRScheduler`` callbacks (a continuation keeps the final learning rates)."""
    out = clone(net)
    if drop_schedulers:
        cbs = net.callbacks
        cbs = [] if cbs in (None, "disable") else list(cbs)
        out.set_params(callbacks=[c for c in cbs if not isinstance(
            c[1] if isinstance(c, tuple) else c, LRScheduler)])
    with torch.random.fork_rng():
        out.initialize()
    out.module_.load_state_dict(trained.module_.state_dict())
    out.optimizer_.load_state_dict(trained.optimizer_.state_dict())
    return out


def training_copy(net):
    """A copy of the fitted ``net`` that takes training steps without touching ``net``.

    Its modules, criteria and optimizers are deep-copied together (the optimizers hold the
    copied parameters); everything else is shared, and it has no callbacks, so
    ``train_step`` runs skorch's own step (zero the gradients, ``infer``, ``get_loss``,
    backward, ``optimizer.step``) and notifies nobody.
    """
    work = object.__new__(type(net))
    work.__dict__.update(net.__dict__)
    names = [n + "_" for n in (*net._modules, *net._criteria, *net._optimizers)
             if n + "_" in net.__dict__]
    work.__dict__.update(zip(names, copy.deepcopy([net.__dict__[n] for n in names])))
    work.__dict__["callbacks_"] = []
    return work


def step_replayer(net, data_fn):
    """A :class:`~hydrattr._core.checkpoint.ModuleReplayer` on a :func:`training_copy` of
    the fitted ``net``: recorded steps taken again with skorch's ``train_step`` on the
    batches ``data_fn(rows)``, the ops of training in the same order (a checkpointed
    trajectory recomputes its steps with it)."""
    work = training_copy(net)
    return ModuleReplayer(work.module_, work.optimizer_,
                          lambda x, y: work.train_step((x, y)), data_fn)


class Recording:
    """What :func:`record_fit` hands back.

    Attributes
    ----------
    net : skorch.NeuralNet
        The trained clone (it no longer holds the recorder).
    interrupted : bool
        Training was stopped by Ctrl-C (skorch ends ``fit`` quietly then).
    trajectory, spec : Trajectory, ParamSpec or None
        The recorded steps and the flat parameter layout (``what`` "trajectory"/"rows").
    problems : list of str
        What makes the record differ from the real update (see
        :meth:`TrajectoryRecorder.problems`); empty when faithful.
    first_nonfinite_loss : int or None
        First step whose training loss was not finite.
    last_grad : torch.Tensor or None
        The gradient the last applied step used (flat).
    recorder : Callback or None
        The recorder itself, emptied of the trajectory and the data (HYDRA's fused
        recorder keeps its store there).
    dynamics : TrainingDynamics or None
        The rows' training dynamics (``what="dynamics"``).
    """

    def __init__(self, net, interrupted):
        self.net, self.interrupted = net, bool(interrupted)
        self.trajectory = self.spec = self.first_nonfinite_loss = self.last_grad = None
        self.recorder = self.dynamics = None
        self.problems = []


_WHAT = ("trajectory", "rows", "dynamics", None)


def record_fit(net, X, y, what="trajectory", *, seed=None, record_rng=False,
               storage="memory", directory=None, make_recorder=None):
    """Clone ``net``, train the clone on ``(X, y)`` with skorch's own ``fit`` while a
    recorder watches, and return a :class:`Recording`.

    ``X`` and ``y`` are passed to ``fit`` as they are (cast them to the module's dtype
    first). The caller's ``net`` and its callback objects are never touched; the trained
    clone keeps none of the recorder (which holds the trajectory and the data).

    Parameters
    ----------
    what : {"trajectory", "rows", "dynamics", None}
        ``"trajectory"``: every step's parameters, rows, weights and hyperparameters
        (:class:`TrajectoryRecorder`, in ``storage``/``directory``); ``"rows"``: the same
        but only the last step's parameters (``storage="last"``: O(P) memory);
        ``"dynamics"``: each row's margins and probabilities in the training forward
        passes (``y`` must hold class indices); None: a plain fit.
    seed : int or None
        Seed torch with it right before training.
    record_rng : bool
        Record the RNG state of every step (to replay dropout masks).
    make_recorder : callable or None
        ``make_recorder(dataset, record_rng) -> TrajectoryRecorder`` instead of the
        default recorder (HYDRA's fused fit passes its subclass); when it returns None
        the default is used.
    """
    if what not in _WHAT:
        raise ValueError(f"what must be one of {_WHAT}, got {what!r}")
    net = clone(net)
    data = RecordingDataset(net.get_dataset(X, y))
    recorder = None
    if what == "dynamics":
        recorder = DynamicsRecorder(y)
    elif what is not None and make_recorder is not None:
        recorder = make_recorder(data, record_rng)
    if recorder is None and what in ("trajectory", "rows"):
        recorder = TrajectoryRecorder(data, record_rng=record_rng, directory=directory,
                                      storage="last" if what == "rows" else storage)
    own = net.callbacks
    if recorder is not None:
        # the clone's own copies of the callbacks, so that training never initialises
        # (and attaches schedulers to) the caller's callback objects
        callbacks = [] if own in (None, "disable") else list(own)
        net.set_params(callbacks=callbacks + [("hydrattr_recorder", recorder)])
    if seed is not None:
        torch.manual_seed(int(seed))
    with watch_interrupts() as sigints:
        net.fit(data, y)
    out = Recording(net, sigints)
    if recorder is None:
        return out
    if what == "dynamics":
        out.dynamics = recorder.dynamics()
    else:
        out.problems = recorder.problems(net)
        out.trajectory, out.spec = recorder.trajectory_, recorder.spec_
        out.interrupted = out.interrupted or recorder.interrupted_
        out.first_nonfinite_loss = recorder.first_nonfinite_loss()
        out.last_grad = recorder.last_grad_
        # The fitted net must not keep the recorder: it holds the trajectory and the
        # training data, which would otherwise stay alive (and be pickled) with the net
        # after fast mode has dropped them.
        recorder.trajectory_ = recorder.dataset = recorder._params = None
        recorder.last_grad_ = None
        out.recorder = recorder
    net.callbacks_ = [(n, cb) for n, cb in net.callbacks_ if cb is not recorder]
    net.callbacks = own
    return out


def fit_recording_dynamics(net, X, y, seed=None):
    """Train a clone of ``net`` on ``(X, y)`` as ``net.fit`` would and return it with the
    rows' :class:`~hydrattr.label_issues.TrainingDynamics`.

    ``X`` is cast to the module's parameter dtype; ``y`` holds encoded class indices. With
    ``seed`` torch is seeded first (as the attributors do). The returned net does not keep
    the recorder. Raises ``KeyboardInterrupt`` when interrupted (skorch would stop quietly)
    and ``ValueError`` when the training margins are not finite (a diverged run).
    """
    from ._inputs import cast_inputs

    dtype = next(probe_net(net).module_.parameters()).dtype
    Xc = cast_inputs(X, torch.empty(0, dtype=dtype).numpy().dtype)
    rec = record_fit(net, Xc, np.asarray(y, dtype=np.int64), what="dynamics", seed=seed)
    if rec.interrupted:
        raise KeyboardInterrupt("training was interrupted (Ctrl-C); nothing was scored.")
    dyn = rec.dynamics
    if not np.isfinite(dyn.mean_margin()[dyn.seen]).all():
        raise ValueError("net: training diverged (non-finite outputs during training); "
                         "lower net.lr or check net.criterion against the module's output.")
    return rec.net, dyn
