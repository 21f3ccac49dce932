"""The stability audit's report: ``audit.md`` and one self-contained ``audit.html``, made from the audit dict alone.

Both render the blocks of :func:`~stablenet.workflows.audit_document.audit_blocks`. The HTML has its CSS inline
and every figure as a ``data:`` URI: it opens in any browser with no server and no network. Every string taken
from the audit is escaped (HTML entities; Markdown backslashes).

Example:
    >>> import json
    >>> audit = json.load(open("runs/audit/audit.json"))
    >>> write_audit_report(audit, "runs/audit")  # doctest: +SKIP
    (PosixPath('runs/audit/audit.md'), PosixPath('runs/audit/audit.html'))
"""

from __future__ import annotations

import base64
import html
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stablenet.atomic import atomic_write_bytes, atomic_write_text
from stablenet.workflows.audit_document import Block, audit_blocks
from stablenet.workflows.audit_figures import render_figures

__all__ = ["render_html", "render_markdown", "write_audit_report"]

logger = logging.getLogger(__name__)

_CSS = """
body{margin:0;background:#fff;color:#1f2328;line-height:1.45;font-size:16px;
 font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1100px;margin:0 auto;padding:12px 24px 48px}
h1{font-size:1.6em;margin:.3em 0 .1em}
h2{font-size:1.3em;border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin:1.4em 0 .5em}
h2#summary{margin-top:.6em}
h3{font-size:1.1em;margin:1.2em 0 .4em}
p{margin:.4em 0}
.subtitle{color:#57606a;margin-top:0}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin:12px 0}
.card{border:1px solid #d0d7de;border-radius:8px;padding:8px 14px;background:#f6f8fa}
.card .label,.card .detail{color:#57606a;font-size:.9em}
.card .value{font-size:2em;font-weight:600}
.warnings{border:1px solid #cf222e;background:#ffebe9;color:#82071e;border-radius:8px;padding:6px 14px}
.warnings ul{margin:.3em 0;padding-left:1.3em}
.ok{border:1px solid #2da44e;background:#dafbe1;color:#116329;border-radius:8px;padding:6px 14px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;margin:8px 0;font-size:.95em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left;vertical-align:top}
th.num,td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f6f8fa}
figure{margin:12px 0}
img{max-width:100%;height:auto;display:block}
figcaption,.missing{color:#57606a;font-style:italic}
"""


def _numeric(rows: Sequence[Sequence[str]], column: int) -> bool:
    """Whether a column holds numbers (aligned right): every cell starts with a digit, a sign or is missing."""
    return all(re.match(r"[-+−]?\d|–$", row[column]) for row in rows)


def _html_block(block: Block, figures: Mapping[str, bytes]) -> str:
    kind, e = block[0], html.escape
    if kind in ("h1", "h2"):
        anchor = re.sub(r"[^a-z]+", "-", block[1].split()[0].lower()).strip("-")
        return f'<{kind} id="{anchor}">{e(block[1])}</{kind}>'
    if kind == "h3":
        return f"<h3>{e(block[1])}</h3>"
    if kind == "p":
        return f"<p>{e(block[1])}</p>"
    if kind in ("subtitle", "missing"):
        return f'<p class="{kind}">{e(block[1])}</p>'
    if kind == "cards":
        cards = "".join(
            f'<div class="card"><div class="label">{e(label)}</div><div class="value">{e(value)}</div>'
            f'<div class="detail">{e(detail)}</div></div>'
            for label, value, detail in block[1]
        )
        return f'<div class="cards">{cards}</div>'
    if kind == "warnings":
        if not block[1]:
            return '<div class="ok">No warnings.</div>'
        items = "".join(f"<li>{e(w)}</li>" for w in block[1])
        return f'<div class="warnings"><strong>Warnings</strong><ul>{items}</ul></div>'
    if kind == "table":
        num = [' class="num"' if i and _numeric(block[2], i) else "" for i in range(len(block[1]))]
        head = "".join(f"<th{c}>{e(h)}</th>" for c, h in zip(num, block[1], strict=True))
        body = "".join(
            "<tr>" + "".join(f"<td{c}>{e(x)}</td>" for c, x in zip(num, row, strict=True)) + "</tr>" for row in block[2]
        )
        return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'
    name, caption, reason = block[1:]
    if name not in figures:
        return f'<p class="missing">{e(caption)}: {e(reason or "no data")}.</p>'
    data = base64.b64encode(figures[name]).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
        f"<figcaption>{e(caption)}</figcaption></figure>"
    )


def render_html(audit: Mapping[str, Any], figures: Mapping[str, bytes]) -> str:
    """The audit as one self-contained HTML5 page: inline CSS, every figure a ``data:`` URI, nothing fetched.

    Args:
        audit: The audit dict (``format`` ``stablenet-audit/1``).
        figures: PNG bytes by figure name (see :func:`~stablenet.workflows.audit_figures.render_figures`); a
            figure not given is replaced by a line saying why.

    Raises:
        ValueError: If ``audit`` is not a ``stablenet-audit/1`` dict.
    """
    blocks = audit_blocks(audit)
    title = html.escape(blocks[0][1])
    body = "\n".join(_html_block(b, figures) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def _md(text: str) -> str:
    """Backslash-escape what Markdown would read as markup (emphasis, links, HTML tags, table cells)."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", str(text))


def _md_block(block: Block, figure_paths: Mapping[str, str]) -> str:
    kind = block[0]
    if kind in ("h1", "h2", "h3"):
        return "#" * int(kind[1]) + " " + _md(block[1])
    if kind in ("p", "subtitle"):
        return _md(block[1])
    if kind == "missing":
        return f"*{_md(block[1])}*"
    if kind == "cards":
        return "\n".join(f"- **{_md(label)}: {_md(value)}** ({_md(detail)})" for label, value, detail in block[1])
    if kind == "warnings":
        return "\n".join(["**Warnings:**", "", *(f"- {_md(w)}" for w in block[1])]) if block[1] else "No warnings."
    if kind == "table":
        rule = "|".join("---:" if i and _numeric(block[2], i) else "---" for i in range(len(block[1])))
        lines = ["| " + " | ".join(map(_md, block[1])) + " |", f"|{rule}|"]
        return "\n".join(lines + ["| " + " | ".join(map(_md, row)) + " |" for row in block[2]])
    name, caption, reason = block[1:]
    if name not in figure_paths:
        return f"*{_md(caption)}: {_md(reason or 'no data')}.*"
    return f"![{_md(caption)}]({figure_paths[name]})"


def render_markdown(audit: Mapping[str, Any], figure_paths: Mapping[str, str]) -> str:
    """The audit as Markdown, with the same content as :func:`render_html` and figures linked by path.

    Args:
        audit: The audit dict (``format`` ``stablenet-audit/1``).
        figure_paths: Path of each figure's PNG relative to the Markdown file, by figure name.

    Raises:
        ValueError: If ``audit`` is not a ``stablenet-audit/1`` dict.
    """
    return "\n\n".join(_md_block(b, figure_paths) for b in audit_blocks(audit)) + "\n"


def write_audit_report(
    audit: Mapping[str, Any],
    out: str | os.PathLike,
    thumbnails: Mapping[int, np.ndarray] | None = None,
) -> tuple[Path, Path]:
    """Write ``out/audit.md`` (its figures in ``out/figures/*.png``) and the self-contained ``out/audit.html``.

    Every file is written atomically (:mod:`stablenet.atomic`), the figures first, so a report never links a
    figure that is not there.

    Args:
        audit: The audit dict (``format`` ``stablenet-audit/1``).
        out: Output folder (created if needed).
        thumbnails: Images of the disagreement examples, data-set index -> array (C, H, W) in [0, 1], C 1 or 3;
            ``None``: no thumbnails figure.

    Returns:
        The paths of ``audit.md`` and ``audit.html``.

    Raises:
        ValueError: If ``audit`` is not a ``stablenet-audit/1`` dict, or a thumbnail's shape
            is not (C, H, W) with C 1 or 3.
    """
    out = Path(out)
    audit_blocks(audit)  # check the audit before writing anything
    figures = render_figures(audit, thumbnails)
    paths = {}
    for name, png in figures.items():
        atomic_write_bytes(out / "figures" / f"{name}.png", png)
        paths[name] = f"figures/{name}.png"
    markdown = atomic_write_text(out / "audit.md", render_markdown(audit, paths))
    page = atomic_write_text(out / "audit.html", render_html(audit, figures))
    logger.info("wrote %s and %s", markdown, page)
    return markdown, page
