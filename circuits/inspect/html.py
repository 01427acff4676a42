"""Self-contained HTML for inspection reports: one page skeleton, tables, embedded figures,
and the checks of a report's format and output folder.

Used by ``inspect`` (:mod:`.report`) and ``diff`` (:mod:`.diff`); images are PNGs embedded as
base64 so that a page opens without a server or its folder.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

from .._display import table_html, value_html

__all__ = ["page", "table", "figure", "png_base64", "cell", "bullet_list", "output_folder"]

_STYLE = """body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:2px 5px;text-align:right;vertical-align:top}
td:first-child,td:last-child{text-align:left}tr.flag{background:#fde7e7}
figure{display:inline-block;margin:1em;vertical-align:top}img{max-width:900px}
.limits{background:#f4f4f4;padding:.5em 1em;font-size:13px}"""


def cell(value: Any) -> str:
    """One table cell as HTML: floats to 4 significant digits, NaN/Inf flagged in red (never
    blank: a NaN statistic is a finding), None empty, lists joined."""
    return value_html(value)


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], flagged: Iterable[bool] = ()) -> str:
    """An HTML table; rows whose ``flagged`` entry is true are highlighted; NaN/Inf cells flagged."""
    return table_html(columns, rows, flagged)


def png_base64(fig: Any, dpi: int = 90) -> str:
    """A matplotlib figure as base64 PNG text."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure(title: str, b64: str, filename: str = "") -> str:
    """An embedded PNG with its caption (and a link to the file beside the page, if any)."""
    link = f' (<a href="{html.escape(filename)}">{html.escape(filename)}</a>)' if filename else ""
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(title)}{link}</figcaption></figure>")


def bullet_list(items: Iterable[str]) -> str:
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return f"<ul>{lis}</ul>" if lis else ""


def page(title: str, body: str) -> str:
    """A complete HTML document."""
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head><body>\n{body}\n</body></html>\n")


def output_folder(format: str, formats: Sequence[str], out_dir: Optional[Union[str, Path]],
                  error: type = ValueError) -> Optional[Path]:
    """Check a report's ``format`` and ``out_dir`` before any work; ``error`` says what is wrong.

    Returns the output folder (``None`` when not given). ``"html"`` needs a folder; an existing
    path that is not a folder is refused.
    """
    if format not in formats:
        raise error(f"format must be one of {', '.join(formats)}; got {format!r}")
    if format == "html" and out_dir is None:
        raise error("format 'html' needs an output folder (--out DIR)")
    out = Path(out_dir).expanduser() if out_dir is not None else None
    if out is not None and out.exists() and not out.is_dir():
        raise error(f"output path {out} exists and is not a folder; choose another with --out")
    return out
