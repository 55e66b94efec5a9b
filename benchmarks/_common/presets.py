"""Presets: the sizes and schedules the benchmarks run at, named once.

``table3_paper`` / ``table4_paper`` are the HYDRA paper's settings (50,000 / 10,000 rows,
lr 0.01, MNIST drop at epoch 5; 20 and 50 epochs); ``table3_quick`` / ``table4_quick`` the
reduced runs whose committed results the docs quote (4,000 rows: the paper's lr leaves
LeNet-5 at chance with so few steps, hence lr 0.05 and a later drop); ``peers`` /
``peers_quick`` the peer comparison's task.
"""
from __future__ import annotations

PRESETS = {
    "table3_paper": dict(n_train=50000, n_valid=10000, n_test=10000, epochs=20, lr=0.01,
                         milestone=5),
    "table3_quick": dict(n_train=4000, n_valid=1000, n_test=2000, epochs=12, lr=0.05,
                         milestone=8),
    "table4_paper": dict(n_train=50000, n_valid=10000, n_reference=1000, epochs=50, lr=0.01,
                         milestone=5),
    "table4_quick": dict(n_train=4000, n_valid=1000, n_reference=200, epochs=15, lr=0.05,
                         milestone=10),
    "peers": dict(n_train=5000, n_test=500, n_loo=100, n_lds=50, epochs=10, trak_models=50),
    "peers_quick": dict(n_train=1000, n_test=100, n_loo=50, n_lds=20, epochs=5,
                        trak_models=5),
}

_HELP = {"n_train": "training rows", "n_valid": "clean validation rows (the scoring set)",
         "n_test": "test rows", "n_reference": "validation points the signs refer to",
         "epochs": "training epochs", "lr": "initial learning rate (paper: 0.01)",
         "milestone": "MNIST: epoch at which the lr is multiplied by 0.1 (paper: 5)"}


def add_setting_args(parser, preset, skip=(), **defaults):
    """Add ``--n-train``, ``--n-valid``, ... (every key of ``PRESETS[preset]`` but
    ``skip``) to ``parser``, with the preset's values (or ``defaults``) as defaults."""
    for key, value in {**PRESETS[preset], **defaults}.items():
        if key in skip:
            continue
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value,
                            help=_HELP.get(key))


def apply_preset(args, preset, **extra):
    """Set the attributes of ``args`` that ``PRESETS[preset]`` names (those ``args`` has),
    then ``extra``: what ``--quick`` does."""
    for key, value in {**PRESETS[preset], **extra}.items():
        if hasattr(args, key):
            setattr(args, key, value)
    return args
