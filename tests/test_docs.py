"""Build the documentation with warnings as errors when Sphinx is installed.

Equivalent to ``make -C docs html-noplot`` (the gallery examples themselves are run by
tests/test_examples.py; ``make -C docs html`` runs them inside the build too). Skipped
when the ``docs`` extra (sphinx, sphinx-gallery, pydata-sphinx-theme, numpydoc) is not
installed.
"""
import os
import re
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


    html = tmp_path / "html"
    pages = {p.relative_to(html).as_posix(): p.read_text(errors="replace")
             for p in html.rglob("*.html")}
    # math is pre-rendered (docs/_ext/mathtext_svg.py): no page loads anything to draw
    # it, and every formula's image exists
    for name, text in pages.items():
        assert not re.search(r"<script[^>]*(mathjax|cdn)", text, re.I), f"{name} loads MathJax"
        assert not re.search(r'(src|href)="https?://[^"]*\.(js|css)"', text), name
    images = re.findall(r'<img class="math" src="([^"]+)"', pages["user_guide.html"])
    assert images and all((html / src).is_file() for src in images)
    # the raw runs behind the results pages each have their own title
    raw = [name for name in pages if name.startswith("gen_modules/results/")
           and name != "gen_modules/results/index.html"]
    titles = [re.search(r"<title>(.*?)</title>", pages[n], re.S).group(1) for n in raw]
    assert raw and len(set(titles)) == len(titles), sorted(titles)
    # a page without sub-pages has no (empty) left sidebar; the results section has one
    assert "bd-sidebar-primary bd-sidebar hide-on-wide" in pages["user_guide.html"]
    assert "bd-sidebar-primary bd-sidebar hide-on-wide" not in pages["results/index.html"]
