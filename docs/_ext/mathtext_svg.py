"""Render the documentation's math to SVG at build time with matplotlib's mathtext.

The pages then need neither a network (no MathJax from a CDN) nor a LaTeX install:
matplotlib is already a dependency of hydrattr. Each formula becomes one SVG file under
``_images/math/`` (named by a hash of its text and size, so rebuilds reuse it), drawn
with glyph outlines (no fonts to load) and shown with an ``<img>`` whose height is set
in ``em`` so that it scales with the text around it.

mathtext understands most of the TeX a formula needs (fractions, sums, sub- and
superscripts, ``\\text``, ``\\mathrm``, ``\\mathcal``, Greek letters, accents) but no
environments (``\\begin{aligned}``, ``\\\\`` line breaks): write one formula per
``.. math::`` line. A formula it cannot parse is a build warning (an error under
``-W``) naming the formula and the page.
"""
from __future__ import annotations

import hashlib
import html
import io
import re
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

# TeX spellings mathtext lacks, rewritten to ones it has
_ALIASES = {r"\ge": r"\geq", r"\le": r"\leq", r"\ne": r"\neq", r"\lvert": "|",
            r"\rvert": "|", r"\lVert": r"\Vert", r"\rVert": r"\Vert", r"\dots": r"\ldots",
            r"\tfrac": r"\frac", r"\dfrac": r"\frac"}
_ALIAS_RE = re.compile("|".join(re.escape(k) for k in sorted(_ALIASES, key=len,
                                                              reverse=True)) + r"(?![A-Za-z])")

_FONT_PT = 12.0  # rendering size; the <img> is scaled in em, so this only sets detail


def _tex(latex: str) -> str:
    latex = " ".join(latex.split())  # mathtext is one line
    return _ALIAS_RE.sub(lambda m: _ALIASES[m.group(0)], latex)


def _render(app, latex: str, display: bool):
    """Write the SVG of ``latex`` (cached by content); return (relative uri, height_em,
    depth_em, width_em)."""
    import matplotlib
    from matplotlib import mathtext
    from matplotlib.font_manager import FontProperties

    size = _FONT_PT * (1.2 if display else 1.0)
    tex = _tex(latex)
    key = hashlib.sha1(f"{tex}|{size}|{display}".encode()).hexdigest()[:16]
    outdir = Path(app.builder.outdir) / app.builder.imagedir / "math"
    metadir = Path(app.doctreedir) / "mathtext_svg"  # sizes, kept out of the site
    svg, meta = outdir / f"{key}.svg", metadir / f"{key}.txt"
    if not (svg.exists() and meta.exists()):
        outdir.mkdir(parents=True, exist_ok=True)
        metadir.mkdir(parents=True, exist_ok=True)
        with matplotlib.rc_context({"mathtext.fontset": "cm", "svg.fonttype": "path",
                                    "svg.hashsalt": key, "text.color": "black"}):
            parser = mathtext.MathTextParser("path")
            prop = FontProperties(size=size)
            width, height, depth, _, _ = parser.parse(f"${tex}$", dpi=72, prop=prop)
            buf = io.BytesIO()
            mathtext.math_to_image(f"${tex}$", buf, prop=prop, dpi=72, format="svg")
        text = buf.getvalue().decode()
        # no metadata date: identical formulas give identical files
        text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
        svg.write_text(text)
        meta.write_text(f"{width} {height} {depth}")
    width, height, depth = map(float, meta.read_text().split())
    uri = f"{app.builder.imgpath}/math/{key}.svg"
    return uri, height / size, depth / size, width / size


def _img(self, node, display):
    latex = node.astext()
    try:
        uri, h, d, w = _render(self.builder.app, latex, display)
    except Exception as exc:  # mathtext's parse errors are ValueErrors with a caret
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        logger.warning("math not rendered (matplotlib mathtext): %r: %s", latex, msg,
                       location=node)
        self.body.append(f'<span class="math notrendered">{html.escape(latex)}</span>')
        raise nodes.SkipNode from None
    # Computer Modern looks smaller than the theme's sans-serif at the same size
    scale = 1.3 if display else 1.12
    style = (f"height: {h * scale:.3f}em; width: {w * scale:.3f}em; "
             f"vertical-align: {-d * scale:.3f}em")
    return (f'<img class="math" src="{uri}" alt="{html.escape(latex)}" '
            f'title="{html.escape(latex)}" style="{style}"/>')


def visit_math(self, node):
    self.body.append(_img(self, node, display=False))
    raise nodes.SkipNode


def visit_displaymath(self, node):
    img = _img(self, node, display=True)
    self.body.append(self.starttag(node, "div", CLASS="math"))
    self.body.append("<p>")
    if node.get("number"):
        from sphinx.util.math import get_node_equation_number
        self.body.append(f'<span class="eqno">({get_node_equation_number(self, node)})')
        self.add_permalink_ref(node, "Link to this equation")
        self.body.append("</span>")
    self.body.append(img + "</p>\n</div>")
    raise nodes.SkipNode


def setup(app):
    app.add_html_math_renderer("mathtext_svg", inline_renderers=(visit_math, None),
                               block_renderers=(visit_displaymath, None))
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
