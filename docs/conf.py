"""Sphinx configuration of the hydrattr documentation.

Build with ``make -C docs html`` (warnings are errors: ``-W --keep-going``), or
``make -C docs html-noplot`` to skip running the gallery examples.

Two pages are generated here at build time, so the site documents only what exists:

* ``gen_modules/api.rst``: the API reference lists the public names of every
  hydrattr module that imports (new modules appear when they land, missing ones are
  simply left out);
* ``gen_modules/results/``: one page per committed benchmark table
  ``benchmarks/results/*.md`` plus a page with every figure ``benchmarks/results/*.png``.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import hydrattr  # noqa: E402
import torch  # noqa: E402

# the examples and figures use tiny models: more threads only add contention
torch.set_num_threads(int(os.environ.get("HYDRATTR_DOCS_THREADS", "1")))

# -- project -------------------------------------------------------------------------
project = "hydrattr"
author = "the hydrattr developers"
copyright = "2025, the hydrattr developers"
release = hydrattr.__version__
version = ".".join(release.split(".")[:2])

# -- extensions ----------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
    "sphinx_gallery.gen_gallery",
]
try:
    import myst_parser  # noqa: F401

    extensions.append("myst_parser")
    HAVE_MYST = True
except ImportError:  # the benchmark tables are then shown as plain text
    HAVE_MYST = False

source_suffix = {".rst": "restructuredtext"}
if HAVE_MYST:
    source_suffix[".md"] = "markdown"
    myst_enable_extensions = ["dollarmath"]
    suppress_warnings = ["myst.header", "myst.xref_missing"]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints",
                    "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.md5",
                    "auto_examples/*.pickle", "auto_examples/*.json"]
root_doc = "index"
default_role = "literal"

# autodoc / autosummary / numpydoc
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "inherited-members": False}
autodoc_typehints = "none"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_validation_checks = set()
numpydoc_xref_param_type = False

# plot directive (pictures in the user guide)
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"figure.autolayout": False}

# sphinx-gallery
plot_gallery = os.environ.get("HYDRATTR_DOCS_PLOT_GALLERY", "True")
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py|/_",
    "within_subsection_order": "FileNameSortKey",
    "doc_module": ("hydrattr",),
    "backreferences_dir": "gen_modules/backreferences",
    "download_all_examples": False,
    "abort_on_example_error": True,
    "remove_config_comments": True,
    "min_reported_time": 1,
    "write_computation_times": False,
    "show_memory": False,
    "reset_modules": ("matplotlib",),
    "capture_repr": (),
}

# -- HTML ----------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"hydrattr {release}"
html_static_path = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False
html_context = {"default_mode": "light"}


# -- generated pages ------------------------------------------------------------------
# (module, title, what) for the API reference; modules that do not import are skipped
API_MODULES = [
    ("hydrattr", "Attributors", "classes"),
    ("hydrattr.cleaning", "Cleaning noisy labels", "all"),
    ("hydrattr.detection", "Detection", "all"),
    ("hydrattr.metrics", "Metrics", "all"),
    ("hydrattr.similarity", "Similarity baselines", "all"),
    ("hydrattr.datasets", "Datasets", "all"),
    ("hydrattr.models", "Reference networks", "all"),
    ("hydrattr.plotting", "Plotting", "all"),
]


def _public_names(modname, what):
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # a module another engineer has not finished yet
        print(f"docs: {modname} left out of the API reference ({exc!r})")
        return []
    names = [n for n in getattr(mod, "__all__", []) if not n.startswith("_")
             and callable(getattr(mod, n, None))]  # classes and functions, not constants
    if what == "classes":
        names = [n for n in names if isinstance(getattr(mod, n, None), type)]
    else:
        names = [n for n in names if n not in _API_CLASSES_SEEN]
    return names


_API_CLASSES_SEEN: set = set()


API_INTRO = """\
API reference
=============

Every attributor follows the contract of the :doc:`/user_guide`: ``fit(X, y)`` trains a
clone of the skorch net, ``attribute(X_test, y_test)`` returns ``C`` of shape
``(n_train, n_test)`` with positive entries for helpful samples.

"""


def write_api_page(out_dir: Path):
    """Write gen_modules/api.rst listing every public name of the modules that exist."""
    lines = [API_INTRO]
    for modname, title, what in API_MODULES:
        names = _public_names(modname, what)
        if not names:
            continue
        if what == "classes":
            _API_CLASSES_SEEN.update(names)
        lines += [title, "-" * len(title), "", f".. currentmodule:: {modname}", "",
                  ".. autosummary::", "   :toctree: generated/", "   :nosignatures:", ""]
        lines += [f"   {n}" for n in names] + [""]
    _write_if_changed(out_dir / "api.rst", "\n".join(lines) + "\n")


def _write_if_changed(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _title_of(md_text, stem):
    for line in md_text.splitlines():
        if line.startswith("# "):
            return None  # the file has its own H1
        if line.strip():
            break
    return stem.replace("_", " ")


def write_results(out_dir: Path):
    """Copy benchmarks/results/*.md and *.png into gen_modules/results and index them."""
    src = ROOT / "benchmarks" / "results"
    dst = out_dir / "results"
    mds = sorted(src.glob("*.md")) if src.is_dir() else []
    pngs = sorted(src.glob("*.png")) if src.is_dir() else []
    dst.mkdir(parents=True, exist_ok=True)
    keep = set()
    for png in pngs:
        shutil.copy2(png, dst / png.name)
        keep.add(png.name)
    entries = []
    for md in mds:
        text = md.read_text()
        title = _title_of(text, md.stem)
        if HAVE_MYST:
            name = md.stem + ".md"
            body = (f"# {title}\n\n" if title else "") + text
            body += f"\n\n*Source: `benchmarks/results/{md.name}`*\n"
        else:
            name = md.stem + ".rst"
            head = title or md.stem
            body = (f"{head}\n{'=' * len(head)}\n\n"
                    f".. literalinclude:: {md.name}\n   :language: text\n")
            shutil.copy2(md, dst / md.name)
            keep.add(md.name)
        _write_if_changed(dst / name, body)
        keep.add(name)
        entries.append(f"results/{md.stem}")
    if pngs:
        lines = ["Figures", "=======", "",
                 "Every figure saved under ``benchmarks/results/``.", ""]
        for png in pngs:
            lines += [png.stem.replace("_", " "), "-" * len(png.stem), "",
                      f".. image:: {png.name}", "   :width: 90%", f"   :alt: {png.stem}", ""]
        _write_if_changed(dst / "figures.rst", "\n".join(lines) + "\n")
        keep.add("figures.rst")
        entries.append("results/figures")
    for stale in dst.iterdir():
        if stale.name not in keep:
            stale.unlink()
    if entries:
        body = ".. toctree::\n   :maxdepth: 1\n\n" + "".join(
            f"   gen_modules/{e}\n" for e in entries)
    else:
        body = ("No benchmark results are committed yet: run the scripts in "
                "``benchmarks/`` (see above).\n")
    _write_if_changed(out_dir / "results_body.inc", body)


GEN = HERE / "gen_modules"
write_api_page(GEN)
write_results(GEN)


def _skip_member(app, what, name, obj, skip, options):
    # scikit-learn's metadata-routing helpers (set_fit_request, ...) are generated on
    # every estimator; their docstrings point into sklearn's own docs
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


_TRAILING_UNDERSCORE = re.compile(r"(?<![\w`\\])([A-Za-z_]\w*[A-Za-z0-9])_(?![\w`])")
_LITERAL = re.compile(r"(``.*?``|`[^`]*`)")
_PARAM_HEADER = re.compile(r"^(\s*[\w*, ]+ : )(.*)$")


def _escape_trailing_underscores(app, what, name, obj, options, lines):
    """Escape fitted-attribute names such as ``n_reference_`` written without backticks
    (e.g. in shapes ``(n_train, n_reference_)``): reST would take them for hyperlink
    references and fail the build. Parameter names before `` : `` and literals are left
    alone."""
    for k, line in enumerate(lines):
        head, rest = "", line
        m = _PARAM_HEADER.match(line)
        if m:
            head, rest = m.group(1), m.group(2)
        parts = _LITERAL.split(rest)
        for p in range(0, len(parts), 2):
            parts[p] = _TRAILING_UNDERSCORE.sub(r"\1\\_", parts[p])
        lines[k] = head + "".join(parts)


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)
    # before numpydoc (priority 500) so that it sees the escaped text
    app.connect("autodoc-process-docstring", _escape_trailing_underscores, priority=100)
