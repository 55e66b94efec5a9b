"""Sphinx configuration of the hydrattr documentation.

Build with ``make -C docs html`` (warnings are errors: ``-W --keep-going``), or
``make -C docs html-noplot`` to skip running the gallery examples.

Two pages are generated here at build time, so the site documents only what exists:

* ``gen_modules/api.rst``: the API reference lists the public names of every
  hydrattr module that imports (new modules appear when they land, missing ones are
  simply left out);
* ``gen_modules/results/``: the raw runs behind the results pages (docs/results/):
  one page per committed benchmark table ``benchmarks/results/*.md``, titled by its
  heading plus what the file name says about the run (dataset, noise, size), a page
  with every figure ``benchmarks/results/*.png``, and an index grouping them by
  question. The figures are copied there too, so the results pages can show them.

Math is rendered to SVG at build time by matplotlib's mathtext
(``_ext/mathtext_svg.py``): the site loads nothing from the network and the build needs
no LaTeX.
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
sys.path.insert(0, str(HERE / "_ext"))
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
    "mathtext_svg",  # math as SVG, offline (docs/_ext/mathtext_svg.py)
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
    myst_update_mathjax = False  # math is pre-rendered (no MathJax classes needed)
    suppress_warnings = ["myst.header", "myst.xref_missing"]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints",
                    "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.md5",
                    "auto_examples/*.pickle", "auto_examples/*.json"]
root_doc = "index"
default_role = "literal"

html_math_renderer = "mathtext_svg"

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
html_static_path = ["_static"]
# custom.css: math SVGs inverted in dark mode, compact results tables. Pages carry no
# ``.. contents::`` box of their own: the theme's "On this page" sidebar is the page's
# table of contents
html_css_files = ["custom.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "primary_sidebar_end": [],  # (default: an ethical-ads slot, empty here)
    "show_nav_level": 1,  # sub-pages (e.g. the raw runs) start collapsed
}
html_show_sourcelink = False
html_context = {"default_mode": "light"}


# -- generated pages ------------------------------------------------------------------
# (module, title, what) for the API reference; modules that do not import are skipped
API_MODULES = [
    ("hydrattr", "Attributors", "classes"),
    ("hydrattr.cleaning", "Cleaning noisy labels", "all"),
    ("hydrattr.label_issues", "Finding label issues (functional core)", "all"),
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


def _h1_of(md_text):
    for line in md_text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
        if line.strip():
            return None
    return None


# raw-run groups of the results index: a result file goes with its script's folder
# (benchmarks/perf/bench_fast.py -> "perf"); files whose script is not found are
# matched by name (first pattern wins)
FOLDER_GROUPS = {"perf": "Speed and memory", "accuracy": "Accuracy against peers",
                 "paper": "The paper's tables", "studies": "Studies"}
RAW_GROUPS = [
    ("Speed and memory",
     r"^(bench_(fast|exact|memory|scaling|cleaner_storage)|fig_scaling)"),
    ("Accuracy against peers",
     r"^(bench_(peers|linearity|influence|adam_fast)|fig_fast_vs_exact)"),
    ("Studies", r"^(table3_(gap|tuned)|table4_splits|hydra_objectives|loo_cleaning"
                         r"|oof_cleaning|cleaning_from_parts|label_noise)"),
    ("The paper's tables", r"^table[34]_"),
]
_WORDS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "quick": "quick run",
          "lr": "logistic regression", "mlp": "MLP", "if": "influence functions",
          "arnoldi": "Arnoldi", "avx2": "AVX2 machine", "ens": "ensemble",
          "lenet5": "LeNet-5", "bn": "BatchNorm", "cpu": "CPU", "all": "all runs merged",
          "rounds": "two cleaning rounds", "final-lr": "final-LR phase"}


def _scripts():
    """{script name: its folder under benchmarks/ ("" at the top)}, longest names first,
    helper modules (any part starting with "_") left out."""
    bench = ROOT / "benchmarks"
    found = {}
    for p in sorted(bench.rglob("*.py")):
        rel = p.relative_to(bench)
        if any(part.startswith(("_", ".")) for part in rel.parts) or "results" in rel.parts:
            continue
        found[p.stem] = rel.parts[0] if len(rel.parts) > 1 else ""
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def _script_of(stem, scripts):
    return next((s for s in scripts if stem == s or stem.startswith(s + "_")), None)


def _run_facets(stem, scripts):
    """What a result file's name says about its run: 'table3_n50000_e20_mnist_r80' ->
    ['50,000 rows', '20 epochs', 'MNIST', '80% noise'] (the script's name dropped)."""
    script = _script_of(stem, scripts)
    rest = stem[len(script):].lstrip("_") if script else stem
    first = rest.split("_")[0]
    if not script and any(s.split("_")[0] == first for s in scripts):
        rest = rest[len(first):].lstrip("_")  # 'table3_n50000...' of table3_noise_cleaning
    rest = rest.replace("final_lr", "final-lr")
    out = []
    for tok in filter(None, rest.split("_")):
        for pattern, fmt in ((r"n(\d+)", "{:,} rows"), (r"(\d+)k", "{:,},000 rows"),
                             (r"e(\d+)", "{} epochs"), (r"r(\d\d)", "{}% noise"),
                             (r"ens(\d+)", "{}-run ensemble"), (r"(\d+)epochs?", "{} epoch")):
            m = re.fullmatch(pattern, tok)
            if m:
                out.append(fmt.format(int(m.group(1))))
                break
        else:
            out.append(_WORDS.get(tok, tok))
    return out


def write_results(out_dir: Path):
    """Copy benchmarks/results/*.md and *.png into gen_modules/results and index them.

    Files that share a heading (e.g. the sixteen "Table 3: cleaning label noise
    (LeNet-5)" runs) get what their name says about the run appended to the title, so
    every raw-run page has its own. The index groups them by question (RAW_GROUPS)."""
    src = ROOT / "benchmarks" / "results"
    dst = out_dir / "results"
    mds = sorted(src.glob("*.md")) if src.is_dir() else []
    pngs = sorted(src.glob("*.png")) if src.is_dir() else []
    dst.mkdir(parents=True, exist_ok=True)
    keep = {"index.rst"}
    for png in pngs:
        if not (dst / png.name).exists() or (dst / png.name).read_bytes() != png.read_bytes():
            shutil.copy2(png, dst / png.name)
        keep.add(png.name)
    texts = {md.stem: md.read_text() for md in mds}
    h1s = {stem: _h1_of(text) for stem, text in texts.items()}
    shared = {h for h in h1s.values() if h and list(h1s.values()).count(h) > 1}
    scripts = _scripts()
    titles = {}
    for stem, h1 in h1s.items():
        facets = _run_facets(stem, scripts)
        if h1 is None:
            titles[stem] = stem.replace("_", " ")
        elif h1 in shared:
            titles[stem] = f"{h1} \N{EM DASH} {', '.join(facets) or stem}"
        else:
            titles[stem] = h1
    for stem, title in titles.items():  # still equal: fall back to the file name
        if list(titles.values()).count(title) > 1:
            titles[stem] = f"{title} [{stem}]"
    groups = {name: [] for name in ["Speed and memory", "Accuracy against peers",
                                    "The paper's tables", "Studies", "Other runs"]}
    for md in mds:
        text, title = texts[md.stem], titles[md.stem]
        if HAVE_MYST:
            name = md.stem + ".md"
            if h1s[md.stem] is not None:  # replace the first heading by the page title
                body = re.sub(r"^# .*$", lambda _m: f"# {title}", text, count=1, flags=re.M)
            else:
                body = f"# {title}\n\n{text}"
            body += f"\n\n*Source: `benchmarks/results/{md.name}`*\n"
        else:
            name = md.stem + ".rst"
            body = (f"{title}\n{'=' * len(title)}\n\n"
                    f".. literalinclude:: {md.name}\n   :language: text\n")
            shutil.copy2(md, dst / md.name)
            keep.add(md.name)
        _write_if_changed(dst / name, body)
        keep.add(name)
        group = FOLDER_GROUPS.get(scripts.get(_script_of(md.stem, scripts)))
        group = group or next((g for g, pat in RAW_GROUPS if re.match(pat, md.stem)),
                              "Other runs")
        groups[group].append(md.stem)
    if pngs:
        lines = ["All figures", "===========", "",
                 "Every figure saved under ``benchmarks/results/``.", ""]
        for png in pngs:
            lines += [png.stem.replace("_", " "), "-" * len(png.stem), "",
                      f".. image:: {png.name}", "   :width: 90%", f"   :alt: {png.stem}", ""]
        _write_if_changed(dst / "figures.rst", "\n".join(lines) + "\n")
        keep.add("figures.rst")
    for stale in dst.iterdir():
        if stale.name not in keep:
            stale.unlink()
    lines = ["Raw runs", "========", "",
             "Every benchmark table committed under ``benchmarks/results/``, as its script "
             "wrote it: the command, the machine and every number. The "
             ":doc:`results pages </results/index>` summarise them.", ""]
    if not mds:
        lines += ["No benchmark results are committed yet: run the scripts in "
                  "``benchmarks/``.", ""]
    for group, stems in groups.items():
        if not stems:
            continue
        lines += [group, "-" * len(group), "", ".. toctree::", "   :maxdepth: 1", ""]
        lines += [f"   {stem}" for stem in stems] + [""]
    if pngs:
        lines += ["Figures", "-------", "", ".. toctree::", "   :maxdepth: 1", "",
                  "   figures", ""]
    _write_if_changed(dst / "index.rst", "\n".join(lines) + "\n")


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


def _drop_empty_primary_sidebar(app, pagename, templatename, context, doctree):
    """No left sidebar on pages whose top-level section has no sub-pages (the user
    guide, the architecture page, ...): the theme would show an empty column there.
    Sections with sub-pages (results, gallery, API) keep their navigation."""
    env = app.env
    parent = {kid: page for page, kids in env.toctree_includes.items() for kid in kids}
    top, seen = pagename, set()
    while parent.get(top) not in (None, app.config.root_doc) and top not in seen:
        seen.add(top)
        top = parent[top]
    if top == app.config.root_doc or not env.toctree_includes.get(top):
        context["sidebars"] = []


def setup(app):
    app.connect("html-page-context", _drop_empty_primary_sidebar)
    app.connect("autodoc-skip-member", _skip_member)
    # before numpydoc (priority 500) so that it sees the escaped text
    app.connect("autodoc-process-docstring", _escape_trailing_underscores, priority=100)
