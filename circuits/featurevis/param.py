"""Image parameterizations: what the optimiser actually changes.

An :class:`ImageParam` holds one leaf tensor for a *batch* of independent images and maps it
to pixels ``[batch, C, H, W]`` in ``[0, 1]``. Every batch element is initialised from its own
``torch.Generator`` (seeded per element), so an image does not depend on which other images
share its batch.

* ``"fft"`` (default, Lucid's look): random complex coefficients (std 0.01) over the
  ``rfft2`` frequencies of an ``H x W`` image, scaled per frequency by
  ``1 / max(|f|, 1 / max(H, W))``, inverse FFT with ``norm="ortho"`` (identical to Lucid's
  ``sqrt(H*W)`` factor with TensorFlow's unnormalised inverse), divided by 4.
* ``"pixel"``: the pixels themselves (std 0.01 noise), before the same colour handling.

Colour: with 3 channels the values are multiplied by the square root of ImageNet's colour
correlation matrix normalised by its largest column norm (``decorrelate=True``), then a
sigmoid maps them to ``[0, 1]``. With 1 channel (grayscale models such as FashionInception)
only the sigmoid is applied.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["ImageParam", "PARAMS", "INIT_SD", "COLOR_CORRELATION_SQRT", "fft_scale", "describe"]

PARAMS = ("fft", "pixel")
#: Standard deviation of the random initial values (Lucid's).
INIT_SD = 0.01

#: Square root of ImageNet's colour correlation matrix (Lucid's ``color_correlation_svd_sqrt``).
COLOR_CORRELATION_SQRT = torch.tensor(
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], dtype=torch.float32
)


def _color_matrix() -> torch.Tensor:
    """``[3, 3]`` matrix ``M`` such that ``rgb = M @ decorrelated`` (max column norm 1)."""
    m = COLOR_CORRELATION_SQRT
    return m / m.norm(dim=0).max()


def fft_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """Per-frequency scale ``[H, W // 2 + 1]``: ``1 / max(|f|, 1 / max(H, W)) ** decay_power``."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    freqs = torch.sqrt(fx * fx + fy * fy)
    return (1.0 / torch.clamp(freqs, min=1.0 / max(h, w)) ** decay_power).float()


class ImageParam:
    """A batch of independent parameterized images.

    Args:
        seeds: one integer per image; image ``i`` is initialised from ``torch.Generator``
            seeded with ``seeds[i]`` (so batching never changes an image).
        channels: 3 (colour) or 1 (grayscale).
        size: ``(H, W)`` of the parameterized image.
        kind: ``"fft"`` or ``"pixel"``.
        decorrelate: colour decorrelation (3 channels only).
        sd: standard deviation of the random initial values.
        device: where the parameters live.
        dtype: floating dtype of the parameters and images (the model's dtype).

    ``param.tensor`` is the leaf to optimise; ``param()`` returns ``[B, C, H, W]`` in ``[0, 1]``.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        channels: int,
        size: tuple[int, int],
        kind: str = "fft",
        decorrelate: bool = True,
        sd: float = INIT_SD,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if kind not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {kind!r}")
        if channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {channels}")
        h, w = size
        if h < 1 or w < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.kind, self.channels, self.size = kind, channels, (h, w)
        self.decorrelate = decorrelate and channels == 3
        device = torch.device(device)
        shape = (channels, h, w // 2 + 1, 2) if kind == "fft" else (channels, h, w)
        init = []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            init.append(torch.randn(shape, generator=g) * sd)
        self.tensor = torch.stack(init).to(device=device, dtype=dtype).requires_grad_(True)
        self._scale = fft_scale(h, w)[None, None, :, :].to(device=device, dtype=dtype) if kind == "fft" else None
        self._color = _color_matrix().to(device=device, dtype=dtype) if self.decorrelate else None

    @property
    def batch(self) -> int:
        return self.tensor.shape[0]

    def __call__(self) -> torch.Tensor:
        """Pixels ``[B, C, H, W]`` in ``[0, 1]``."""
        h, w = self.size
        if self.kind == "fft":
            spectrum = torch.view_as_complex(self.tensor) * self._scale
            x = torch.fft.irfft2(spectrum, s=(h, w), norm="ortho") / 4.0
        else:
            x = self.tensor
        if self._color is not None:
            x = torch.einsum("ij,bjhw->bihw", self._color, x)
        return torch.sigmoid(x)

    def state(self) -> torch.Tensor:
        """A detached copy of the optimised values (for debugging / resuming)."""
        return self.tensor.detach().clone()


def describe(kind: str, decorrelate: bool, sd: float = INIT_SD) -> dict:
    """The parameterization part of a cache request."""
    return {"kind": kind, "decorrelate": bool(decorrelate), "sd": float(sd), "fft_div": 4.0 if kind == "fft" else None}

