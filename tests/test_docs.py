"""Build the documentation with warnings as errors when Sphinx is installed.

Equivalent to ``make -C docs html-noplot`` (the gallery examples themselves are run by
tests/test_examples.py; ``make -C docs html`` runs them inside the build too). Skipped
when the ``docs`` extra (sphinx, sphinx-gallery, pydata-sphinx-theme, numpydoc) is not
installed.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_docs_build_without_warnings(tmp_path):
    for module in ("sphinx", "sphinx_gallery", "pydata_sphinx_theme", "numpydoc"):
        pytest.importorskip(module)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-q",
           "-D", "plot_gallery=0", "-d", str(tmp_path / "doctrees"), str(DOCS),
           str(tmp_path / "html")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (
        f"sphinx-build failed (exit {proc.returncode}); warnings are errors:\n"
        f"{proc.stderr[-6000:]}")
    assert (tmp_path / "html" / "index.html").exists()
