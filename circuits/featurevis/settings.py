"""One object for every setting of a feature-visualization render.

:class:`RenderSettings` is the single shape in which render settings travel: keyword
arguments of :func:`~circuits.featurevis.render`, plans, page builders and experiment
configs all map onto it. It is frozen, validates itself, round-trips through JSON
(:meth:`~RenderSettings.to_dict` / :meth:`~RenderSettings.from_dict`) and says which of its
fields change an image (:data:`RenderSettings.IMAGE_FIELDS`, part of the cache request) and
which only change how fast it is made (:data:`RenderSettings.SPEED_FIELDS`).

::

    from circuits.featurevis import RenderSettings, render
    s = RenderSettings(steps=256, seed=1)
    render(model, ["mixed4a:3"], s)
    render(model, ["mixed4a:3"], s.replace(lr=0.1))
    render(model, ["mixed4a:3"], steps=256, seed=1)          # the same as the first call
    RenderSettings.from_dict({"steps": 256, "size": 28})     # from a config's ``render:`` section
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import numpy as np

from .param import PARAMS
from .transforms import Transforms

__all__ = ["RenderSettings", "SCHEDULES", "TRANSFORM_NAMES", "REDIRECT_STEPS", "default_optimizer"]

#: Steps at the start of an optimisation during which ``redirected_relu=True`` uses the redirected ReLU.
REDIRECT_STEPS = 16

#: Learning-rate schedules: ``"constant"`` (Lucid's), ``"cosine"`` (``lr`` decayed along half a
#: cosine to ``lr / 10`` at the last step), ``"onecycle"`` (linear warm-up over the first 10% of
#: the steps to ``lr``, then the cosine decay).
SCHEDULES = ("constant", "cosine", "onecycle")
#: Named transform sets: ``"default"`` (:func:`~circuits.featurevis.transforms.default_transforms`
#: for the image size), ``"lucid"`` (Lucid's, at any size) and ``"none"``.
TRANSFORM_NAMES = ("default", "lucid", "none")

Size = Union[int, Sequence[int], None]


def _pair_or_none(value: Size, what: str) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an int or (height, width), got {value!r}")
    if isinstance(value, (int, np.integer)):
        pair = (int(value), int(value))
    else:
        try:
            items = list(value)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(f"{what} must be an int or (height, width), got {value!r}") from None
        if len(items) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            raise ValueError(f"{what} must be an int or (height, width), got {value!r}")
        pair = (int(items[0]), int(items[1]))
    if min(pair) < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return pair


def _transforms(value: object) -> Union[str, Transforms]:
    if value is None:
        return "default"
    if value is False:
        return "none"
    if isinstance(value, str):
        if value not in TRANSFORM_NAMES:
            raise ValueError(f"transforms must be one of {TRANSFORM_NAMES}, a dict of Transforms fields or a "
                             f"Transforms; got {value!r}")
        return value
    if isinstance(value, Transforms):
        return value
    if isinstance(value, Mapping):
        valid = [f.name for f in fields(Transforms)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"unknown Transforms field(s) {unknown}; valid: {valid}")
        return Transforms(**dict(value))
    raise TypeError(f"transforms must be None, one of {TRANSFORM_NAMES}, a dict of Transforms fields or a "
                    f"Transforms; got {type(value).__name__}")


@dataclass(frozen=True)
class RenderSettings:
    """Everything that decides how a feature visualization is rendered.

    Args:
        steps: optimisation steps (Adam).
        size: side of the parameterized image, an int or ``(height, width)``; ``None``: the
            model's input side capped at 128 (128 for InceptionV1, 28 for FashionInception).
        param: ``"fft"`` (Fourier image + colour decorrelation + sigmoid, Lucid's look) or
            ``"pixel"``.
        decorrelate: colour decorrelation (3-channel models only).
        seed: base seed; image ``i`` uses :func:`~circuits.featurevis.element_seed` ``(seed, target)``.
        transforms: per-step robustness transforms: ``"default"`` (or ``None``: Lucid's at 128 px
            and above, scaled down below, see :func:`~circuits.featurevis.transforms.default_transforms`),
            ``"lucid"``, ``"none"`` (or ``False``), a dict of
            :class:`~circuits.featurevis.transforms.Transforms` fields, or a ``Transforms``.
        lr: Adam learning rate (the peak rate for the schedules that vary it); ``None``: the
            default for the image size (:func:`default_optimizer`: Lucid's 0.05 at 128 px and
            above, 0.1 below).
        schedule: learning-rate schedule, one of :data:`SCHEDULES`; ``None``: the default for
            the image size (:func:`default_optimizer`: constant at 128 px and above, cosine below).
        redirected_relu: ``True``: redirected ReLU for the first 16 steps (Lucid's rule) and,
            after them, again while some image is stalled: it got no gradient at all on a step
            with the ordinary ReLU (checked every 4 steps) and its objective has not turned
            positive since (a neuron that is dead for its image, common in random-init
            networks, would otherwise leave that image flat grey). The redirected ReLU changes
            only batch elements that a ReLU cuts off completely, so the other images of the
            batch are not affected.
            ``False``: never. An int: for exactly that many steps (Lucid's rule is 16).
        resize_to: size the transformed image is resampled to before the model, an int or
            ``(height, width)``; ``None``: the model's input size.
        mixed_precision: bfloat16 autocast for the model's forward pass, on CUDA and on CPUs
            with native bfloat16 (:func:`~circuits.featurevis.rendering.bf16_autocast_supported`);
            elsewhere the render runs in the model's dtype and the request records ``False``.
            The final objective values are always evaluated in the model's dtype.
        channels_last: run the model on channels-last tensors; ``None``: automatically (on the
            CPU, where max pooling and convolutions are faster that way). Does not change images
            beyond rounding, so it is not part of the cache request.

    Example:
        >>> s = RenderSettings(steps=64, size=28)
        >>> s.replace(seed=2).seed
        2
        >>> RenderSettings.from_dict(s.to_dict()) == s
        True
    """

    steps: int = 512
    size: Optional[tuple[int, int]] = None
    param: str = "fft"
    decorrelate: bool = True
    seed: int = 0
    transforms: Union[str, Transforms] = "default"
    lr: Optional[float] = None
    schedule: Optional[str] = None
    redirected_relu: Union[bool, int] = True
    resize_to: Optional[tuple[int, int]] = None
    mixed_precision: bool = False
    channels_last: Optional[bool] = None

    #: Fields that change an image: they are part of its cache request.
    IMAGE_FIELDS: ClassVar[tuple[str, ...]] = (
        "steps", "size", "param", "decorrelate", "seed", "transforms", "lr", "schedule", "redirected_relu",
        "resize_to", "mixed_precision",
    )
    #: Fields that change only how fast an image is made.
    SPEED_FIELDS: ClassVar[tuple[str, ...]] = ("channels_last",)

    def __post_init__(self) -> None:
        s = object.__setattr__
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")
        s(self, "steps", int(self.steps))
        s(self, "size", _pair_or_none(self.size, "size"))
        s(self, "resize_to", _pair_or_none(self.resize_to, "resize_to"))
        if self.param not in PARAMS:
            raise ValueError(f"param must be one of {PARAMS}, got {self.param!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        s(self, "seed", int(self.seed))
        s(self, "decorrelate", _flag(self.decorrelate, "decorrelate"))
        s(self, "mixed_precision", _flag(self.mixed_precision, "mixed_precision"))
        if self.channels_last is not None:
            s(self, "channels_last", _flag(self.channels_last, "channels_last"))
        s(self, "transforms", _transforms(self.transforms))
        if self.lr is not None:
            if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(float(self.lr)) or float(self.lr) <= 0:
                raise ValueError(f"lr must be a positive finite number or None, got {self.lr!r}")
            s(self, "lr", float(self.lr))
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {self.schedule!r}")
        r = self.redirected_relu
        if not isinstance(r, (bool, int, np.integer)) or (not isinstance(r, bool) and r < 0):
            raise ValueError(f"redirected_relu must be True, False or a non-negative number of steps, got {r!r}")
        if not isinstance(r, bool):
            s(self, "redirected_relu", int(r))

    # -- construction -------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The settings' field names, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RenderSettings":
        """Settings from a dict (e.g. :meth:`to_dict`'s output or a config's ``render:`` section).

        Raises ``ValueError`` naming the valid keys if ``data`` has an unknown key."""
        if not isinstance(data, Mapping):
            raise TypeError(f"RenderSettings.from_dict needs a mapping, got {type(data).__name__}")
        valid = cls.field_names()
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"unknown render setting(s) {unknown}; valid: {list(valid)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "RenderSettings":
        """A copy with ``changes`` applied (validated); an unknown name is a ``TypeError`` naming the valid ones."""
        valid = self.field_names()
        unknown = sorted(set(changes) - set(valid))
        if unknown:
            raise TypeError(f"unknown render setting(s) {unknown}; valid: {list(valid)}")
        return dataclasses.replace(self, **changes)

    # -- views --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists, a ``Transforms`` as a dict of its fields) that
        :meth:`from_dict` turns back into equal settings."""
        out: dict[str, Any] = {}
        for name in self.field_names():
            v = getattr(self, name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Transforms):
                v = {k: (list(x) if isinstance(x, tuple) else x) for k, x in v.to_dict().items()}
            out[name] = v
        return out

    def image_dict(self) -> dict[str, Any]:
        """The :data:`IMAGE_FIELDS` of :meth:`to_dict` (what decides the images, unresolved)."""
        d = self.to_dict()
        return {k: d[k] for k in self.IMAGE_FIELDS}

    def redirect_steps(self) -> int:
        """Number of steps at the start that use the redirected ReLU."""
        r = self.redirected_relu
        return REDIRECT_STEPS if r is True else (0 if r is False else int(r))

    def redirect_stalled(self) -> bool:
        """Whether the redirected ReLU also returns, after :meth:`redirect_steps`, while an image is
        stalled (no gradient, objective not positive): only for ``redirected_relu=True``."""
        return self.redirected_relu is True


def default_optimizer(size: Union[int, Sequence[int]]) -> tuple[float, str]:
    """``(lr, schedule)`` used when the settings leave them ``None``, for an image of ``size``.

    At 128 px and above Lucid's constant 0.05. Below, 0.1 decayed along a cosine to 0.01: on
    the bundled 28 px Fashion-MNIST model the constant 0.05 left some neurons (``mixed4a:5``)
    within 2% of, or below, the best test image after 512 steps, while the cosine schedule from
    0.1 beat it by at least 30% for every one of the 26 acceptance targets and seeds 0-2, and
    reached Lucent's 512-step quality in under a fifth of the steps.
    """
    side = min(size) if not isinstance(size, (int, np.integer)) else int(size)
    return (0.05, "constant") if side >= 128 else (0.1, "cosine")


def _flag(value: object, what: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise ValueError(f"{what} must be True or False, got {value!r}")
