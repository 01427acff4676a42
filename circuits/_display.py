"""Rich notebook display: the helpers behind every result type's ``_repr_html_``.

Jupyter shows an object through its ``_repr_html_``; the result types a researcher looks at
(:class:`~circuits.featurevis.RenderResult`, :class:`~circuits.nmf.NeuronFactors`,
:class:`~circuits.nmf.FamilyFactors`, :class:`~circuits.expanded.Connection`,
:class:`~circuits.figures.FigureResult`, :class:`~circuits.inspect.StatsTable`,
:class:`~circuits.inspect.CheckpointDiff`, :class:`~circuits.figures.NeuronCard`) build theirs
from these pieces:

- images inlined as base64 PNG (``<img src="data:image/png;base64,...">``), thumbnail-sized:
  small arrays (5x5 weights, 28x28 renders) are upscaled by an integer factor with nearest
  neighbours, large ones are shrunk, so the longest side is about :data:`THUMB` pixels;
- weight slices on the diverging red/blue palette of :mod:`circuits.figures.palette`;
- HTML tables whose NaN/Inf values show as a red flag (:func:`nan_flag`), never as a blank;
- :class:`HtmlBudget`: every repr stays below :data:`MAX_HTML_BYTES` (200 KB); items that do
  not fit are left out and the repr says how many.

Nothing here imports matplotlib or torch at import time (``import circuits`` stays light);
the palette and PIL are imported when a repr is drawn.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np

__all__ = [
    "MAX_HTML_BYTES",
    "THUMB",
    "HtmlBudget",
    "as_numpy",
    "count_nonfinite",
    "flag_html",
    "nan_flag",
    "value_html",
    "png_bytes",
    "image_pixels",
    "thumbnail",
    "img_tag",
    "image_html",
    "shared_limit",
    "weights_html",
    "rgb_html",
    "figure_png",
    "tile",
    "table_html",
    "container",
]

#: Upper bound on the size of one repr's HTML (bytes); keeps notebooks light.
MAX_HTML_BYTES = 200_000
#: Longest side of an image thumbnail, in pixels.
THUMB = 96

_NAN_STYLE = "color:#fff;background:#c00;font-weight:bold;padding:0 3px;border-radius:2px"
_CSS = (
    "<style>.circuits-display{font-family:sans-serif;font-size:12px}"
    ".circuits-display figure{display:inline-block;margin:2px 4px;text-align:center;vertical-align:top}"
    ".circuits-display figcaption{font-size:10px;max-width:110px;overflow-wrap:anywhere;white-space:pre-line}"
    ".circuits-display img{image-rendering:pixelated}"
    ".circuits-display table{border-collapse:collapse;font-size:11px}"
    ".circuits-display td,.circuits-display th{border:1px solid #ccc;padding:1px 4px;text-align:right}"
    ".circuits-display td:first-child{text-align:left}.circuits-display tr.flag{background:#fde7e7}"
    ".circuits-display .note{color:#555}</style>"
)


def as_numpy(x: Any) -> np.ndarray:
    """A tensor (any device) or array-like as a float64 NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def count_nonfinite(x: Any) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of an array or tensor."""
    a = as_numpy(x)
    return int(np.isnan(a).sum()), int(np.isinf(a).sum())


def flag_html(text: str) -> str:
    """A red flag with ``text`` (e.g. ``"3 NaN in weights"``)."""
    return f'<span class="circuits-nan" style="{_NAN_STYLE}">&#9888; {html.escape(text)}</span>'


def nan_flag(n_nan: int, n_inf: int = 0, what: str = "") -> str:
    """A red flag naming the non-finite values (``""`` when there are none)."""
    parts = [f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_inf, "Inf")) if n]
    if not parts:
        return ""
    return flag_html(" + ".join(parts) + (f" in {what}" if what else ""))


def value_html(v: Any, digits: int = 4) -> str:
    """One value as HTML text: floats to ``digits`` significant digits, NaN/Inf as a red flag."""
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return f'<span class="circuits-nan" style="{_NAN_STYLE}">NaN</span>'
        if math.isinf(v):
            return f'<span class="circuits-nan" style="{_NAN_STYLE}">{"+" if v > 0 else "-"}Inf</span>'
        return f"{v:.{digits}g}"
    if v is None:
        return ""
    if isinstance(v, (list, tuple)):
        shown = ", ".join(map(str, v[:12]))
        return html.escape(shown + (f" ... ({len(v)})" if len(v) > 12 else ""))
    return html.escape(str(v))


# ----------------------------------------------------------------------------- images


def png_bytes(pixels: np.ndarray) -> bytes:
    """``uint8`` pixels ``[H, W]`` or ``[H, W, 3]`` as PNG bytes."""
    from PIL import Image

    pixels = np.ascontiguousarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError(f"png_bytes needs uint8 [H, W] or [H, W, 3] pixels; got {pixels.dtype} {tuple(pixels.shape)}")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def image_pixels(image: Any) -> np.ndarray:
    """An image in ``[0, 1]`` (``[C, H, W]``, ``[H, W, C]`` or ``[H, W]``, C in {1, 3}) as ``uint8`` pixels."""
    from .figures.palette import to_uint8

    return to_uint8(image)


def thumbnail(pixels: np.ndarray, size: int = THUMB) -> np.ndarray:
    """Resize ``uint8`` pixels so the longest side is about ``size``: small images are upscaled
    by an integer factor (nearest neighbour, one value = one crisp square), large ones shrunk."""
    h, w = pixels.shape[:2]
    side = max(h, w)
    if side <= size:
        f = max(1, round(size / side))
        return np.repeat(np.repeat(pixels, f, axis=0), f, axis=1) if f > 1 else pixels
    from PIL import Image

    scale = size / side
    out = Image.fromarray(np.ascontiguousarray(pixels)).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                              Image.Resampling.BOX)
    return np.asarray(out)


def img_tag(png: bytes, alt: str = "") -> str:
    """``<img src="data:image/png;base64,...">`` for PNG bytes."""
    b64 = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" title="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def image_html(image: Any, size: int = THUMB, alt: str = "") -> str:
    """An image in ``[0, 1]`` as a thumbnail ``<img>``; NaN/Inf pixels add a red flag beside it."""
    flag = nan_flag(*count_nonfinite(image), what="image")
    return img_tag(png_bytes(thumbnail(image_pixels(image), size)), alt) + flag


def shared_limit(arrays: Any) -> float:
    """One colour scale ``m`` (largest finite ``|w|``; 1 when all zero) for one array or several."""
    from .figures.palette import symmetric_limit

    return symmetric_limit(arrays)


def weights_html(weights: Any, limit: Optional[float] = None, size: int = 48, alt: str = "") -> str:
    """A weight slice ``[kh, kw]`` on the diverging palette (red excites, blue inhibits; scale
    ``[-limit, limit]``, default its largest ``|w|``); NaN/Inf add a red flag."""
    from .figures.palette import diverging_rgb

    w = as_numpy(weights)
    if w.ndim == 1:
        w = w[None, :]
    flag = nan_flag(*count_nonfinite(w), what="weights")
    return img_tag(png_bytes(thumbnail(diverging_rgb(w, limit), size)), alt) + flag


def rgb_html(rgb: Any, size: int = THUMB, alt: str = "") -> str:
    """An RGB picture ``[H, W, 3]`` in ``[0, 1]`` (e.g. NMF factors as R, G, B) as a thumbnail."""
    return image_html(rgb, size, alt)


def figure_png(figure: Any, dpi: int = 72, max_bytes: int = MAX_HTML_BYTES - 10_000) -> bytes:
    """A matplotlib figure as PNG bytes whose base64 text fits ``max_bytes``: drawn at ``dpi``,
    lowered down to 36; if still too large (noise-like images), reduced to 256 colours and
    halved in size until it fits."""
    while True:
        buf = io.BytesIO()
        figure.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        data = buf.getvalue()
        if len(data) * 4 // 3 <= max_bytes:
            return data
        if dpi <= 36:
            break
        dpi = max(36, int(dpi * 0.7))
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
    while len(data) * 4 // 3 > max_bytes and min(img.size) > 8:
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        data = out.getvalue()
        img = img.resize((img.size[0] // 2, img.size[1] // 2), Image.Resampling.NEAREST)
    return data


# ----------------------------------------------------------------------------- layout


def tile(items: Iterable[tuple[str, str]]) -> str:
    """``(html, caption)`` pairs as a row of captioned figures that wraps."""
    return "<div>" + "".join(f"<figure>{h}<figcaption>{html.escape(c)}</figcaption></figure>" for h, c in items) + "</div>"


def table_html(columns: Sequence[str], rows: Iterable[Sequence[Any]], flagged: Iterable[bool] = (),
               raw: Iterable[int] = ()) -> str:
    """An HTML table (values through :func:`value_html`); rows whose ``flagged`` entry is true are
    highlighted; columns whose index is in ``raw`` hold HTML already."""
    marks, raw_cols = list(flagged), set(raw)
    body = []
    for i, row in enumerate(rows):
        cls = ' class="flag"' if i < len(marks) and marks[i] else ""
        cells = "".join(f"<td>{v if j in raw_cols else value_html(v)}</td>" for j, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    return f"<table><tr>{head}</tr>" + "".join(body) + "</table>"


class HtmlBudget:
    """Collects HTML pieces up to ``limit`` bytes; what does not fit is counted, not added.

    Example::

        b = HtmlBudget()
        for i, image in enumerate(images):
            if not b.add(image_html(image)):
                b.skip(len(images) - i)   # the rest is left out too
                break
        html = container("RenderResult", "3 images", b)
    """

    def __init__(self, limit: int = MAX_HTML_BYTES - 4000):
        self.limit = limit
        self.parts: list[str] = []
        self.size = 0
        self.left_out = 0

    def add(self, piece: str) -> bool:
        """Append ``piece`` when it fits; returns whether it did."""
        if self.size + len(piece) > self.limit:
            self.left_out += 1
            return False
        self.parts.append(piece)
        self.size += len(piece)
        return True

    def skip(self, n: int = 1) -> None:
        """Count ``n`` more items as left out (not drawn at all)."""
        self.left_out += n

    @property
    def full(self) -> bool:
        return self.left_out > 0

    def html(self) -> str:
        return "".join(self.parts)


def container(type_name: str, title: str, body: "HtmlBudget | str", notes: Sequence[str] = (), flag: str = "") -> str:
    """The repr's outer ``<div class="circuits-display" data-circuits-type=...>``: a title line
    (with ``flag``, e.g. :func:`nan_flag`), the body, notes, and what the budget left out."""
    if isinstance(body, HtmlBudget):
        left_out, body = body.left_out, body.html()
    else:
        left_out = 0
    lines = [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    if left_out:
        lines.append(f'<p class="note">{left_out} more item(s) not shown (display limit '
                     f"{MAX_HTML_BYTES // 1000} KB; index the object for the rest).</p>")
    return (f'<div class="circuits-display" data-circuits-type="{html.escape(type_name)}">{_CSS}'
            f"<b>{html.escape(type_name)}</b> {html.escape(title)} {flag}{body}{''.join(lines)}</div>")
