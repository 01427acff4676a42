"""Robustness transforms applied to the image at every optimisation step, in plain torch.

Lucid's defaults, in order: pad 12 px (constant 0.5), jitter 8 px (a random crop that removes
7 px), random scale from ``{0.90, 0.92, ..., 1.10}``, random rotation from ``{-10°..10°}``
(0° weighted 6x as in Lucid/Lucent), jitter 4 px, then bilinear resize to the model's input
size. All of these are affine maps of the plane, so they are composed into **one** affine
matrix per batch element and applied with a single ``F.affine_grid`` + ``F.grid_sample``
(bilinear, pixels outside the image read 0.5). That is both faster and more accurate than
resampling the image five times.

Geometry (pixel units, origin at the image centre): with ``S = size + 2*pad - (j1 - 1) -
(j2 - 1)`` the size Lucid's pipeline would output at scale 1, an output pixel at normalised
position ``u`` in ``[-1, 1]`` reads the source at ``R(-angle) (u * S / 2 + t2) / scale + t1``,
where ``t1, t2`` are the two jitter offsets (centred). The output is then ``resize_to``
pixels, i.e. Lucid's transformed image, centre-cropped/padded back to ``S`` and resized.
Unlike Lucent (which resizes the *scaled* canvas to 224 px and so cancels the scaling),
the random scale really changes the size at which the network sees the image.

Randomness: all per-step draws for all steps are made up front from each image's own
``torch.Generator`` (:meth:`Transforms.sample`), so a batch element's transforms depend only
on its own seed.

Small images: :func:`default_transforms` keeps Lucid's values at 128 px and above; below, it
shifts the image by whole pixels at its own scale (and drops scale and rotation below
:data:`SMALL_IMAGE` px): at 28 px, shifts of -1, 0, +1 px.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["Transforms", "default_transforms", "LUCID_SCALES", "LUCID_ANGLES", "SMALL_IMAGE"]

LUCID_SCALES: tuple[float, ...] = tuple(1 + (i - 5) / 50.0 for i in range(11))
LUCID_ANGLES: tuple[float, ...] = tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5


@dataclass(frozen=True)
class Transforms:
    """Configuration of the per-step random transforms (Lucid's defaults).

    Args:
        pad: pixels of constant 0.5 added on every side.
        jitter: first random crop: offsets ``0..jitter-1`` (1 = none).
        scales: scale factors drawn uniformly.
        angles: rotation angles in degrees drawn uniformly (repeat a value to weight it).
        jitter2: second random crop after scale and rotation (1 = none).
        fill: value read outside the image.
    """

    pad: int = 12
    jitter: int = 8
    scales: tuple[float, ...] = LUCID_SCALES
    angles: tuple[float, ...] = LUCID_ANGLES
    jitter2: int = 4
    fill: float = 0.5

    def __post_init__(self) -> None:
        for name in ("pad", "jitter", "jitter2"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (0 if name == "pad" else 1):
                raise ValueError(f"Transforms.{name} must be an integer >= {0 if name == 'pad' else 1}, got {v!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales) or (1.0,))
        object.__setattr__(self, "angles", tuple(float(a) for a in self.angles) or (0.0,))
        if any(s <= 0 for s in self.scales):
            raise ValueError(f"Transforms.scales must be positive, got {self.scales}")

    @classmethod
    def none(cls) -> "Transforms":
        """No transform at all (only the resize to the model's input size)."""
        return cls(pad=0, jitter=1, scales=(1.0,), angles=(0.0,), jitter2=1)

    def min_size(self) -> int:
        """Smallest image side these transforms accept: jitter may move the image by at most
        a third of its side (``size >= 3 * (jitter - 1 + jitter2 - 1) + 1``), and padding may
        not exceed the image itself (``size >= pad``)."""
        return max(3 * (self.jitter - 1 + self.jitter2 - 1) + 1, self.pad, 1)

    def check_size(self, size: tuple[int, int]) -> None:
        need = self.min_size()
        if min(size) < need:
            raise ValueError(
                f"image size {size[0]}x{size[1]} is too small for the transforms (pad {self.pad}, "
                f"jitter {self.jitter}, jitter2 {self.jitter2}): need at least {need} px per side. "
                "Use a larger size, default_transforms(size), or Transforms(...) with less pad/jitter"
            )

    def nominal_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The side lengths Lucid's pipeline outputs at scale 1: ``size + 2 pad - (j1-1) - (j2-1)``."""
        extra = 2 * self.pad - (self.jitter - 1) - (self.jitter2 - 1)
        return size[0] + extra, size[1] + extra

    def to_dict(self) -> dict:
        return asdict(self)

    def sample(self, generator: torch.Generator, steps: int) -> torch.Tensor:
        """Draw every step's parameters ``[steps, 6]``: ``(t1x, t1y, scale, angle_deg, t2x, t2y)``.

        Jitter offsets are centred (``offset - (jitter - 1) / 2``)."""
        j1 = torch.randint(self.jitter, (steps, 2), generator=generator).double() - (self.jitter - 1) / 2
        si = torch.randint(len(self.scales), (steps,), generator=generator)
        ai = torch.randint(len(self.angles), (steps,), generator=generator)
        j2 = torch.randint(self.jitter2, (steps, 2), generator=generator).double() - (self.jitter2 - 1) / 2
        scales = torch.tensor(self.scales, dtype=torch.float64)[si]
        angles = torch.tensor(self.angles, dtype=torch.float64)[ai]
        return torch.cat([j1, scales[:, None], angles[:, None], j2], dim=1)

    def matrices(self, draws: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Affine matrices ``[..., 2, 3]`` (float64) for ``F.affine_grid`` (``align_corners=False``) from
        draws ``[..., 6]``; they map output coordinates in ``[-1, 1]`` to source coordinates."""
        h, w = size
        sh, sw = self.nominal_size(size)
        t1x, t1y, scale, angle, t2x, t2y = draws.double().unbind(-1)
        rad = angle * (math.pi / 180.0)
        c, s = torch.cos(rad), torch.sin(rad)
        # source_px = R(-a) (diag(sw/2, sh/2) u + t2) / scale + t1 ; then normalise by (w/2, h/2)
        a00 = c * (sw / 2) / scale / (w / 2)
        a01 = s * (sh / 2) / scale / (w / 2)
        a10 = -s * (sw / 2) / scale / (h / 2)
        a11 = c * (sh / 2) / scale / (h / 2)
        b0 = ((c * t2x + s * t2y) / scale + t1x) / (w / 2)
        b1 = ((-s * t2x + c * t2y) / scale + t1y) / (h / 2)
        row0 = torch.stack([a00, a01, b0], dim=-1)
        row1 = torch.stack([a10, a11, b1], dim=-1)
        return torch.stack([row0, row1], dim=-2)


#: Below this side (px) :func:`default_transforms` uses no random scale or rotation.
SMALL_IMAGE = 64


def default_transforms(size: int | Sequence[int]) -> Transforms:
    """The transforms that :func:`~circuits.featurevis.render` uses by default for an image of ``size``.

    * 128 px and above: Lucid's (:class:`Transforms` ``()``; pad 12, jitter 8, scale 0.9-1.1,
      rotation +-10 degrees, jitter 4).
    * Below 128 px: whole-pixel shifts of up to ``p = max(1, round(side / 32))`` px in each
      direction (pad ``p``, jitter ``2p + 1``; none below 7 px: the model sees the image at its own scale, and
      every shift is an exact pixel move, no resampling blur); from :data:`SMALL_IMAGE` px on,
      Lucid's random scales and rotations as well. At 28 px: shifts of -1, 0, +1 px only.

    Lucid's padding shrinks an image by ``2 pad - jitter + 1`` px on the way to the model and
    its rotations and scalings resample it; at 224 px that is robustness, at 28 px it is a
    different, blurred image: with Lucid's transforms scaled down to 28 px, renders of the
    bundled Fashion-MNIST model stopped below the best test image for up to 9 of 26 targets.
    """
    side = min(size) if not isinstance(size, int) else size
    if side >= 128:
        return Transforms()
    p = max(1, round(side / 32))
    if side < 3 * 2 * p + 1:  # too small to shift at all (Transforms.min_size)
        return Transforms.none()
    if side < SMALL_IMAGE:
        return Transforms(pad=p, jitter=2 * p + 1, scales=(1.0,), angles=(0.0,), jitter2=1)
    return Transforms(pad=p, jitter=2 * p + 1, jitter2=1)


def apply(images: torch.Tensor, theta: torch.Tensor, out_size: tuple[int, int], fill: float = 0.5) -> torch.Tensor:
    """Resample ``images [B, C, H, W]`` with affine matrices ``theta [B, 2, 3]`` to ``out_size``;
    points outside the image read ``fill``. Bilinear."""
    b, ch = images.shape[:2]
    grid = F.affine_grid(theta.to(images.dtype), [b, ch, out_size[0], out_size[1]], align_corners=False)
    if fill == 0:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.grid_sample(images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + fill


def resize(images: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize ``[B, C, H, W]`` → ``[B, C, *out_size]`` (identity when sizes match)."""
    if tuple(images.shape[-2:]) == tuple(out_size):
        return images
    return F.interpolate(images, size=tuple(out_size), mode="bilinear", align_corners=False)

