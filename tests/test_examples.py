"""Run every gallery example (examples/plot_*.py) so that none can rot.

Each example runs in-process with matplotlib's Agg backend and one torch thread (the
examples use tiny models, for which more threads only add contention); a failing
example fails its test with the example's own traceback. Each example takes well under
a minute of CPU time, so none is marked slow.
"""
import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("plot_*.py"))


@pytest.fixture
def example_env(monkeypatch, tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    import torch

    backend = matplotlib.get_backend()
    plt.switch_backend("Agg")
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        plt.close("all")
        plt.switch_backend(backend)


def test_examples_found():
    assert EXAMPLES, "no examples/plot_*.py found"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, example_env):
    import matplotlib.pyplot as plt

    runpy.run_path(str(path), run_name="__main__")
    # every gallery example is expected to draw at least one figure
    assert plt.get_fignums(), f"{path.name} drew no figure"
