"""The ``hydrattr`` command.

``hydrattr demo`` trains a small skorch network on data with injected label noise,
attributes the validation loss to every training sample with HYDRA, and reports how
well the most harmful samples find the flipped labels, beside the net's own training
loss as a baseline. With no arguments it runs on sklearn's embedded digits in well under
a minute; ``--dataset mnist`` or ``--dataset fashion-mnist`` with ``--data-dir`` (or
``HYDRATTR_DATA``) runs LeNet-5 on the real data.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
import zlib

import numpy as np

from . import __version__

__all__ = ["main", "run_demo"]

_DESCRIPTION = """\
Training-data attribution with HYDRA for skorch networks.

'hydrattr demo' trains a small network on data with injected label noise, attributes
the validation loss to every training sample with HYDRA and reports how well the most
harmful samples find the flipped labels, beside the net's own training loss as a
baseline. Run 'hydrattr demo --help' for its options."""

_DEMO_DESCRIPTION = """\
Train a small skorch network on data with a fraction of its labels flipped, attribute
the mean validation loss to the training rows with HYDRA, print the most harmful and
most helpful rows, and compare how well the lowest HYDRA score and the highest own
training loss find the flipped labels (ROC AUC and precision at the noise rate).

With no options it runs on sklearn's embedded digits (no files needed). For
--dataset mnist or fashion-mnist, pass --data-dir (or set HYDRATTR_DATA) to a folder
holding the original idx .gz files; nothing is downloaded."""

_DEFAULT_EPOCHS = {"digits": 10, "mnist": 3, "fashion-mnist": 3}
_DEFAULT_N_TRAIN = 50000
_DEFAULT_N_VALID = 10000  # validation rows of the (Fashion-)MNIST split


class DemoError(Exception):
    """A refusal of ``hydrattr demo``: printed as one line, exit status 2."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter,
                     argparse.ArgumentDefaultsHelpFormatter):
    """Plain-text descriptions kept as written, and every option's default shown.

    Options whose default depends on others (``None`` in argparse) say so in their
    own help text, so no meaningless "(default: None)" is appended.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False,
                                                                  argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def _int_at_least(low):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    parse.__name__ = "int"
    return parse


def _noise_rate(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


# ------------------------------------------------------------------------- data

def _unreadable_data_file(name, data_dir):
    """The first idx file of ``name`` that is not a complete gzip stream, or None."""
    from . import datasets

    for kind in ("train", "test"):
        files = (datasets.IDX_FILES[f"{kind}_images"], datasets.IDX_FILES[f"{kind}_labels"])
        try:
            folder = datasets.idx_folder(name, data_dir, files)
        except OSError:
            continue
        for f in files:
            path = folder / f
            try:
                with gzip.open(path, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
            except (OSError, EOFError, zlib.error) as exc:
                return path, exc
    return None


def _load(args):
    """The data split of ``args.dataset``; ``DemoError`` naming the fix when it fails."""
    from . import datasets

    if args.dataset == "digits":
        data = datasets.load_digits_split(test_size=0.25, valid_size=0.2,
                                          random_state=args.seed)
        if args.n_valid is not None and args.n_valid > len(data.y_valid):
            raise DemoError(f"--n-valid {args.n_valid} is more than the {len(data.y_valid)} "
                            f"validation rows of digits")
        if args.n_valid is not None:
            data.X_valid, data.y_valid = data.X_valid[:args.n_valid], data.y_valid[:args.n_valid]
        return data
    n_train = args.n_train if args.n_train is not None else _DEFAULT_N_TRAIN
    n_valid = args.n_valid if args.n_valid is not None else _DEFAULT_N_VALID
    try:
        return datasets.load_mnist_split(args.dataset, data_dir=args.data_dir,
                                         random_state=args.seed, n_train=n_train,
                                         n_valid=n_valid)
    except FileNotFoundError as exc:
        raise DemoError(f"{exc} On the command line: --data-dir FOLDER, or "
                        f"{datasets.DATA_ENV_VAR}=FOLDER hydrattr demo ...") from exc
    except (OSError, EOFError, zlib.error) as exc:
        # gzip's own message ("Not a gzipped file (b'..')") does not say which file
        bad = _unreadable_data_file(args.dataset, args.data_dir)
        if bad is None:
            raise DemoError(f"could not read the {args.dataset} data: {exc}") from exc
        path, err = bad
        raise DemoError(f"{path} is not a readable gzip file ({err}); hydrattr reads the "
                        f"original idx .gz files, e.g. train-images-idx3-ubyte.gz") from exc
    except ValueError as exc:
        msg = str(exc).replace("n_train", "--n-train").replace("n_valid", "--n-valid")
        raise DemoError(msg) from exc


def _build(args):
    import torch
    from torch.optim.lr_scheduler import StepLR

    from ._skorch import classifier
    from .models import MLP, LeNet5

    data = _load(args)
    epochs = args.epochs if args.epochs is not None else _DEFAULT_EPOCHS[args.dataset]
    if args.dataset == "digits":
        net = classifier(
            MLP, module__n_features=64, module__n_classes=10, module__hidden=(64,),
            criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.05,
            optimizer__momentum=0.9, optimizer__weight_decay=2e-5, batch_size=32,
            max_epochs=epochs, train_split=None, verbose=0,
            iterator_train__shuffle=True)
        shape = (8, 8)
    else:
        # the paper's schedule: SGD momentum 0.9, batch 64, lr 0.01 x0.1 after epoch 5
        net = classifier(
            LeNet5, criterion=torch.nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
            lr=0.01, optimizer__momentum=0.9, optimizer__weight_decay=2e-5, batch_size=64,
            max_epochs=epochs, train_split=None, verbose=0, iterator_train__shuffle=True,
            schedule=(StepLR, dict(step_size=5, gamma=0.1)))
        shape = (28, 28)
    return data, net, shape


def _tracked_rows(n, track, seed):
    """The training rows to attribute: all, or ``track`` drawn independently of the noise.

    ``make_label_noise`` draws the flipped rows from ``RandomState(seed)``; drawing the
    tracked rows from that same stream would pick exactly the flipped rows first (with
    10% noise and ``track <= n / 10`` every tracked row was a flipped one). A separate
    stream derived from the seed keeps the demo reproducible and the two draws apart.
    """
    if track is None:
        return None
    if track > n:
        raise DemoError(f"--track {track} is more than the {n} training rows")
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=track, replace=False))


# ------------------------------------------------------------------------ output

def _image_grid(images, titles, shape, path, suptitle):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(8, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, img, title in zip(axes.ravel(), images, titles):
        ax.imshow(np.asarray(img).reshape(shape), cmap="gray_r")
        ax.set_title(title, fontsize=7)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path, write):
    """Write through a temporary file in the same folder, then rename.

    ``mkstemp`` creates the temporary file with mode 0600; it gets the mode a plain
    ``open(path, "w")`` would give (0666 less the user's umask) before the rename.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part" + os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _prepare_out(out):
    """Create ``out`` and check that a file can be written there, before training.

    Returns whether the folder was created here (so a failed run can remove it).
    """
    created = not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".hydrattr-write-test")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise DemoError(f"cannot write to --out {out!r}: {exc.strerror or exc}; pass a "
                        f"writable folder, or --out '' to write nothing") from exc
    return created


def _own_loss(net, X, y):
    """Per-sample cross-entropy of the trained net on its own (noisy) training labels."""
    import torch

    with torch.no_grad():
        logits = net.forward(X, training=False)
        return torch.nn.functional.cross_entropy(
            logits, torch.as_tensor(y, dtype=torch.int64, device=logits.device),
            reduction="none").cpu().numpy().astype(np.float64)


def _detection_table(hydra_score, own_loss, margin, flipped, k):
    """Headline numbers of the three scores on the same rows (lower = more suspect)."""
    import pandas as pd

    from . import metrics

    out = []
    for name, suspect in [("HYDRA: lowest score", hydra_score),
                          ("own training loss: highest", -own_loss),
                          ("LabelNoiseCleaner: lowest mean margin", margin)]:
        out.append({"method": name, "ROC AUC": metrics.mislabel_detection_auc(suspect, flipped),
                    f"precision at k={k}": metrics.precision_at_k(suspect, flipped, k)})
    out.append({"method": "random (expected)", "ROC AUC": 0.5,
                f"precision at k={k}": float(np.mean(flipped))})
    return pd.DataFrame(out)


def run_demo(args):
    """Run the demo described in the module docstring; returns a dict of results.

    ``auc`` and ``precision_at_noise_rate`` (HYDRA) and ``own_loss_auc`` and
    ``own_loss_precision`` (the baseline) are None when the tracked rows do not hold
    both flipped and clean labels, so that the numbers are undefined.
    """
    import pandas as pd

    from . import datasets
    from .cleaning import LabelNoiseCleaner
    from .hydra import HydraAttributor

    t0 = time.perf_counter()
    data, net, shape = _build(args)
    n = len(data.y_train)
    if len(data.y_valid) == 0:
        raise DemoError("no validation rows to attribute; raise --n-valid")
    y_noisy, flipped = datasets.make_label_noise(data.y_train, args.noise,
                                                 random_state=args.seed)
    track = _tracked_rows(n, args.track, args.seed)
    created = _prepare_out(args.out) if args.out else False
    try:
        att = HydraAttributor(net, mode=args.mode, storage=args.storage, track=track,
                              random_state=args.seed, verbose=int(not args.quiet))
        att.fit(data.X_train, y_noisy)
    except BaseException:
        if created and not os.listdir(args.out):
            os.rmdir(args.out)
        raise
    acc = float(np.mean(att.net_.predict(data.X_test) == data.y_test))
    # one column: each sample's contribution to the mean validation loss
    scores = att.attribute(data.X_valid, data.y_valid, objective="mean")[:, 0]
    rows = att.rows_
    s, f = scores[rows], flipped[rows]
    own = _own_loss(att.net_, data.X_train[rows], y_noisy[rows])
    # the default cleaner (training dynamics of a second, identically seeded run)
    cleaner = LabelNoiseCleaner(net, random_state=args.seed).fit(data.X_train, y_noisy)
    margin = cleaner.scores_[rows]
    k = max(1, int(round(args.noise * len(rows))))
    table = pd.DataFrame({"row": rows, "label_given": y_noisy[rows],
                          "label_true": data.y_train[rows], "flipped": f, "score": s,
                          "own_loss": own, "margin": margin,
                          "removed_by_cleaner": cleaner.removed_mask_[rows]})
    order = np.argsort(s, kind="stable")
    harmful = table.iloc[order[:args.top]].reset_index(drop=True)
    helpful = table.iloc[order[::-1][:args.top]].reset_index(drop=True)
    print(f"\nhydrattr demo: {args.dataset}, {n} training rows ({len(rows)} tracked, "
          f"{int(f.sum())} of them flipped), {args.noise:.0%} labels flipped, "
          f"HYDRA {args.mode} mode")
    print(f"test accuracy of the noisy-trained net: {acc:.4f}")
    if args.top:
        fmt = lambda v: f"{v:.3g}"  # noqa: E731
        print("\nmost harmful training samples (lowest contribution to validation loss):")
        print(harmful.to_string(index=False, float_format=fmt))
        print("\nmost helpful training samples:")
        print(helpful.to_string(index=False, float_format=fmt))
    removed = cleaner.removed_mask_
    print(f"\nLabelNoiseCleaner (default, no trusted labels) removes {int(removed.sum())} of "
          f"{n} rows; {int((removed & flipped).sum())} of them are flipped, and "
          f"{int((~removed & flipped).sum())} flipped rows stay.")
    results = {"auc": None, "precision_at_noise_rate": None, "own_loss_auc": None,
               "own_loss_precision": None, "cleaner_auc": None, "cleaner_precision": None,
               "cleaner_removed": int(removed.sum()),
               "cleaner_removed_flipped": int((removed & flipped).sum()), "k": k,
               "n_tracked": len(rows), "n_tracked_flipped": int(f.sum()),
               "test_accuracy": acc}
    if 0 < f.sum() < len(f):
        detection = _detection_table(s, own, margin, f, k)
        print(f"\nfinding the flipped labels among the {len(rows)} tracked rows "
              f"(k = the noise rate x tracked rows):")
        print(detection.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        results.update(auc=float(detection.iloc[0, 1]),
                       precision_at_noise_rate=float(detection.iloc[0, 2]),
                       own_loss_auc=float(detection.iloc[1, 1]),
                       own_loss_precision=float(detection.iloc[1, 2]),
                       cleaner_auc=float(detection.iloc[2, 1]),
                       cleaner_precision=float(detection.iloc[2, 2]))
    else:
        which = "no flipped label" if not f.any() else "only flipped labels"
        print(f"\nROC AUC and precision are undefined here: the {len(rows)} tracked rows "
              f"hold {which}, and both need flipped and clean rows. Track more rows "
              f"(--track, or leave it out to track all {n}) or use --noise > 0.")
    if args.out:
        csv = os.path.join(args.out, "scores.csv")
        png = os.path.join(args.out, "harmful_helpful.png")
        picks = list(order[:8]) + list(order[::-1][:8])
        titles = [f"{'-' if i < 8 else '+'} #{rows[p]} y={y_noisy[rows[p]]}"
                  f"{'*' if f[p] else ''}" for i, p in enumerate(picks)]
        try:
            _atomic(csv, lambda p: table.to_csv(p, index=False))
            _atomic(png, lambda p: _image_grid(
                data.X_train[rows[picks]], titles, shape, p,
                "top: 8 most harmful, bottom: 8 most helpful (* = flipped label)"))
        except OSError as exc:
            raise DemoError(f"could not write the results to --out {args.out!r}: "
                            f"{exc.strerror or exc} ({exc.filename or args.out})") from exc
        print(f"wrote {csv} and {png}")
        results.update(csv=csv, png=png)
    elapsed = time.perf_counter() - t0
    results["seconds"] = elapsed
    print(f"done in {elapsed:.1f} s")
    return results


def _parser():
    parser = argparse.ArgumentParser(prog="hydrattr", description=_DESCRIPTION,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="noisy-label demo (digits by default, no files needed)",
                          description=_DEMO_DESCRIPTION, formatter_class=_HelpFormatter)
    demo.add_argument("--dataset", choices=["digits", "mnist", "fashion-mnist"],
                      default="digits", help="data set")
    demo.add_argument("--data-dir", default=None, metavar="FOLDER",
                      help="folder with the idx .gz files of mnist or fashion-mnist "
                           "(default: $HYDRATTR_DATA)")
    demo.add_argument("--noise", type=_noise_rate, default=0.1,
                      help="fraction of training labels flipped, in [0, 1)")
    demo.add_argument("--epochs", type=_int_at_least(1), default=None,
                      help="training epochs (default: 10 on digits, 3 on mnist and "
                           "fashion-mnist)")
    demo.add_argument("--n-train", type=_int_at_least(1), default=None,
                      help=f"training rows of mnist or fashion-mnist (default: "
                           f"{_DEFAULT_N_TRAIN}; digits always uses its 1077)")
    demo.add_argument("--n-valid", type=_int_at_least(1), default=None,
                      help=f"validation rows attributed (default: all: {_DEFAULT_N_VALID} on "
                           f"mnist and fashion-mnist, 270 on digits)")
    demo.add_argument("--track", type=_int_at_least(1), default=None,
                      help="attribute a random subset of this many training rows, drawn "
                           "independently of the flipped ones (default: all rows)")
    demo.add_argument("--mode", choices=["fast", "exact"], default="fast",
                      help="HYDRA mode")
    demo.add_argument("--storage", choices=["dense", "half", "memmap", "replay"],
                      default="dense", help="where fast mode keeps its per-sample store")
    demo.add_argument("--top", type=_int_at_least(0), default=10,
                      help="rows shown in each of the harmful and helpful tables")
    demo.add_argument("--out", default="hydrattr-out", metavar="FOLDER",
                      help="folder for scores.csv and the PNG ('' to write nothing)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the split, the noise, the tracked rows and training")
    demo.add_argument("--quiet", action="store_true",
                      help="no progress bars (default: show them)")
    return parser, demo


def main(argv=None):
    """Entry point of the ``hydrattr`` console script; returns the exit status."""
    parser, demo = _parser()
    args = parser.parse_args(argv)
    if args.dataset == "digits" and args.n_train is not None:
        demo.error("argument --n-train: only for --dataset mnist or fashion-mnist "
                     "(digits always uses its 1077 training rows)")
    try:
        run_demo(args)
    except DemoError as exc:
        print(f"hydrattr: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"hydrattr: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
