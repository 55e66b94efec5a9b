"""The boundaries docs/architecture.rst promises: only _skorch.py imports skorch, no module
imports another's private names, record_fit is the one way to record a fit, trajectories
save and load, and the ensemble is an attributor."""
import ast
import pathlib

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier

from hydrattr import BaseAttributor, EnsembleAttributor, HydraAttributor
from hydrattr._core.trajectory import Trajectory
from hydrattr._skorch import record_fit
from hydrattr.models import MLP

from _blobs import three_blobs  # noqa: E402

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "hydrattr"

pytestmark = pytest.mark.usefixtures("one_thread")


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield 0, a.name, []


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_only_the_skorch_bridge_imports_skorch():
    users = {p.relative_to(PACKAGE).as_posix() for p in _modules()
             for level, mod, _ in _imports(p) if level == 0 and mod.split(".")[0] == "skorch"}
    assert users == {"_skorch.py"}, users


def test_no_module_imports_a_private_name_of_another():
    bad = []
    for p in _modules():
        inside_core = p.parent.name == "_core"
        for level, mod, names in _imports(p):
            if level == 0:
                continue
            if inside_core and level == 1:  # _core's modules share their internals
                continue
            bad += [f"{p.relative_to(PACKAGE)}: {mod}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def _net(**kw):
    params = dict(module=MLP, module__n_features=4, module__n_classes=3, module__hidden=(5,),
                  module__dtype=torch.float64, criterion=torch.nn.CrossEntropyLoss,
                  optimizer=torch.optim.SGD, lr=0.05, optimizer__momentum=0.9, batch_size=8,
                  max_epochs=2, train_split=None, verbose=0)
    params.update(kw)
    if params["optimizer"] is not torch.optim.SGD:
        del params["optimizer__momentum"]
    return NeuralNetClassifier(**params)


def test_record_fit_rows_keeps_only_the_last_snapshot_and_trains_like_net_fit():
    X, y = three_blobs(30, 0)
    full = record_fit(_net(), X, y, what="trajectory", seed=3)
    rows = record_fit(_net(), X, y, what="rows", seed=3)
    plain = record_fit(_net(), X, y, what=None, seed=3)
    ref = _net()
    torch.manual_seed(3)
    ref.fit(X, y)
    for rec in (full, rows, plain):
        for a, b in zip(rec.net.module_.parameters(), ref.module_.parameters()):
            assert torch.equal(a, b)
        assert not any(n == "hydrattr_recorder" for n, _ in rec.net.callbacks_)
    assert plain.trajectory is None
    T, P = len(full.trajectory), full.spec.n_params
    assert len(rows.trajectory) == T == 8
    assert [list(i) for i in rows.trajectory.indices] == [list(i) for i in full.trajectory.indices]
    assert torch.equal(rows.trajectory.theta(T - 1), full.trajectory.theta(T - 1))
    with pytest.raises(RuntimeError, match="last"):
        rows.trajectory.theta(0)
    assert rows.trajectory.nbytes == P * 8 and full.trajectory.nbytes == T * P * 8


def test_trajectory_save_and_load(tmp_path):
    X, y = three_blobs(30, 1)
    traj = record_fit(_net(optimizer=torch.optim.Adam, lr=0.01), X, y, seed=0).trajectory
    traj.save(tmp_path)
    back = Trajectory.load(tmp_path)
    assert len(back) == len(traj) and back.storage == "memmap"
    for t in (0, len(traj) - 1):
        assert torch.equal(back.theta(t), traj.theta(t))
        assert all(torch.equal(a, b) for a, b in zip(back.opt_state(t), traj.opt_state(t)))
    assert back.epoch_starts == traj.epoch_starts
    np.testing.assert_array_equal(back.hyper.lr, traj.hyper.lr)
    head = back.head(3)  # the Steps protocol on a loaded record
    assert len(head) == 3 and torch.equal(head.theta_final, traj.theta(3))


def test_ensemble_is_an_attributor():
    X, y = three_blobs(24, 2)
    ens = EnsembleAttributor(HydraAttributor(_net(), verbose=0), n_estimators=2,
                             random_state=0)
    assert isinstance(ens, BaseAttributor)
    with pytest.raises(ValueError, match="objective"):
        ens.fit(X, y).attribute(X[:3], y[:3], objective="median")
    C = ens.attribute(X[:3], y[:3])
    assert C.shape == (24, 3) and C.dtype == np.float64


def test_fit_warnings_point_at_the_caller():
    from skorch.dataset import ValidSplit

    X, y = three_blobs(30, 3)
    with pytest.warns(UserWarning, match="never entered a gradient step") as rec:
        HydraAttributor(_net(train_split=ValidSplit(5)), verbose=0).fit(X, y)
    assert any(w.filename == __file__ for w in rec if "never entered" in str(w.message))
