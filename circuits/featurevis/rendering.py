"""Render feature visualizations ("variable names") for many targets at once.

``render(model, ["mixed4a:0", "mixed4a:1", ...])`` optimises one image per target, all in one
batch (chunked to a memory budget): each batch element has its own objective, its own
random initialisation and its own random transforms, all derived from ``(seed, target)``, so
an image never depends on the other targets in its batch, on the chunking, or on whether it
came from the cache. (Exactly so for float64 models on the CPU; in float32, oneDNN's
convolutions round differently for different batch sizes, and ties in max pools over the
constant padding can route a gradient differently, so images agree closely, not bitwise.)
The images and the optimisation use the model's floating dtype. The forward pass stops right
after the deepest layer any objective reads (:func:`circuits.layers.run_until`), and the
model's parameters are frozen during the optimisation so that the backward pass computes only
the image gradient.

Settings travel as one :class:`~circuits.featurevis.settings.RenderSettings`; keyword
arguments (``render(model, t, steps=256)``) are applied on top of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import state_dict_hash
from ..layers import capture, layer_names, run_until
from ..layouts import Layout, get_layouts
from ..models import device_and_dtype, input_shape, preprocess_input
from . import transforms as T
from .cache import FeatureVisCache, as_cache
from .fastops import fast_ops
from .objectives import Objective, as_objective, evaluate_batch
from .param import ImageParam, describe
from .relu import redirected_relu
from .settings import REDIRECT_STEPS, RenderSettings, default_optimizer

__all__ = [
    "render",
    "variable_names",
    "cache_requests",
    "activation_floats_per_image",
    "learning_rate",
    "bf16_autocast_supported",
    "RenderResult",
    "RenderWarning",
    "element_seed",
    "REDIRECT_STEPS",
]

#: Version of the cache request format and of the image-changing defaults behind it.
#: 2: per-size default transforms and optimiser, learning-rate schedules, bfloat16 on the CPU, ``param_init``.
#: 3: ``redirected_relu=True`` also revives stalled images after the first 16 steps (``redirect_stalled``).
_CACHE_VERSION = 3

#: After the first redirected steps, stalled images are looked for on every this many steps (the
#: check reads a flag back from the device: on a GPU, once a step would stall the queue).
_STALL_CHECK = 4

TargetLike = Union[str, Objective]
Settings = Union[None, RenderSettings, Mapping[str, Any]]
CacheLike = Union[None, bool, str, FeatureVisCache]
Reference = Union[None, torch.Tensor, np.ndarray, Sequence[float], Mapping[str, float], Iterable]

#: Keyword arguments of :func:`render` that are not settings (they never change an image).
CALL_ARGUMENTS = ("cache", "progress", "device", "batch_size")
#: Every keyword :func:`render` takes besides ``settings``: the :class:`RenderSettings` fields
#: and the call arguments (configs' ``render:`` sections are checked against it).
RENDER_OPTIONS = RenderSettings.field_names() + CALL_ARGUMENTS + ("reference",)


class RenderWarning(UserWarning):
    """A rendered image is not as good as it should be (e.g. it does not beat the data set)."""


@dataclass
class RenderResult:
    """Rendered images and what they reached.

    Attributes:
        images: ``[N, C, H, W]`` float32 in ``[0, 1]`` on the CPU.
        objective_values: ``[N]`` objective of each final image, evaluated on the image
            without random transforms (only resized to the model's input size), in the model's
            dtype with ordinary ReLUs; always finite.
        targets: ``N`` target keys (``"mixed4a:476"``, ``"direction(...)"``).
        seeds: the per-image seed actually used (derived from ``seed`` and the target).
        from_cache: whether each image came from the cache.
        settings: the :class:`RenderSettings` used.
        data_best: ``[N]`` best objective value of the reference data set per target
            (``NaN`` where unknown), or ``None`` when no reference was given.
        beats_data: per image, whether it activates its target more than ``data_best``
            (``None`` where unknown); empty when no reference was given.

    In a notebook the result shows itself (``_repr_html_``): a thumbnail of each image (at most
    48, longest side 96 px, inlined as PNG) with its target and objective value, images that
    do not beat the data set marked; NaN pixels are flagged in red; the HTML stays under
    200 KB (:mod:`circuits._display`).
    """

    images: torch.Tensor
    objective_values: torch.Tensor
    targets: list[str]
    seeds: list[int] = field(default_factory=list)
    from_cache: list[bool] = field(default_factory=list)
    settings: RenderSettings = field(default_factory=RenderSettings)
    data_best: Optional[torch.Tensor] = None
    beats_data: list[Optional[bool]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` for ``plt.imshow``: ``[H, W, 3]``, or ``[H, W]`` for one channel."""
        return _to_display(self.images[i].numpy())

    def _title(self) -> str:
        return f"{len(self)} image(s) {tuple(self.images.shape[1:])}, {self.settings.steps} steps"

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython's text/plain: one line, not every tensor
        p.text(f"{type(self).__name__}({self._title()})")

    def _repr_html_(self) -> str:
        from .. import _display as D

        budget, shown = D.HtmlBudget(), min(len(self), 48)
        for i in range(shown):
            value = float(self.objective_values[i]) if i < len(self.objective_values) else float("nan")
            beats = self.beats_data[i] if i < len(self.beats_data) else None
            caption = f"{self.targets[i]}\nobjective {value:.3g}" + (" (below data)" if beats is False else "")
            flag = D.nan_flag(0 if math.isfinite(value) else 1, what="objective")
            if not budget.add(D.tile([(D.image_html(self.images[i], alt=self.targets[i]) + flag, caption)])):
                budget.skip(shown - i - 1)
                break
        budget.skip(len(self) - shown)
        notes = [f"cached: {sum(self.from_cache)} of {len(self)}"] if self.from_cache else []
        if self.below_data:
            notes.append(f"{len(self.below_data)} image(s) do not beat the best data set example: " + ", ".join(self.below_data[:8]))
        return D.container("RenderResult", self._title(), budget, notes, D.nan_flag(*D.count_nonfinite(self.images), what="images"))

    @property
    def below_data(self) -> list[str]:
        """Targets whose image does not beat the best reference data example (the flagged ones)."""
        return [t for t, b in zip(self.targets, self.beats_data) if b is False]

    def compare_with_data(self, best: Reference, *, warn: bool = True) -> "RenderResult":
        """Fill :attr:`data_best` and :attr:`beats_data` from the best data set value per target.

        ``best``: ``[N]`` values in target order, or ``{target key: value}`` (missing keys stay
        unknown). Warns (:class:`RenderWarning`) when an image does not beat its value. Returns
        ``self``.
        """
        values = _best_values(best, self.targets)
        self.data_best = values
        self.beats_data = [None if math.isnan(float(b)) else bool(float(v) > float(b))
                           for v, b in zip(self.objective_values, values)]
        below = self.below_data
        if warn and below:
            detail = ", ".join(f"{t} {float(self.objective_values[i]):.3g} <= {float(values[i]):.3g}"
                               for i, t in enumerate(self.targets) if self.beats_data[i] is False)
            warnings.warn(f"{len(below)} of {len(self)} rendered image(s) do not beat the best data set example: "
                          f"{detail} (more steps, another seed or other transforms may help)", RenderWarning, stacklevel=2)
        return self


def _best_values(best: Reference, targets: Sequence[str]) -> torch.Tensor:
    if isinstance(best, Mapping):
        vals = torch.tensor([float(best[t]) if t in best else float("nan") for t in targets], dtype=torch.float32)
    else:
        vals = torch.as_tensor(np.asarray(best, dtype=np.float32)).flatten()
        if vals.numel() != len(targets):
            raise ValueError(f"best data values: expected {len(targets)} (one per target), got {vals.numel()}")
    if torch.isinf(vals).any():
        raise ValueError("best data values must be finite (NaN marks an unknown value)")
    return vals


def _to_display(chw: np.ndarray) -> np.ndarray:
    return chw[0] if chw.shape[0] == 1 else np.transpose(chw, (1, 2, 0))


def element_seed(seed: int, key: str) -> int:
    """The seed of one image: a 63-bit hash of ``(seed, target key)``."""
    return int(hashlib.sha256(f"{int(seed)}|{key}".encode()).hexdigest()[:15], 16)


def learning_rate(step: int, steps: int, lr: float, schedule: str = "constant") -> float:
    """The learning rate of ``step`` (0-based) out of ``steps`` under ``schedule``
    (see :data:`~circuits.featurevis.settings.SCHEDULES`)."""
    if schedule == "constant" or steps <= 1:
        return lr
    warm = max(1, round(0.1 * steps)) if schedule == "onecycle" else 0
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(steps - 1 - warm, 1)
    if schedule in ("cosine", "onecycle"):
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))
    raise ValueError(f"unknown schedule {schedule!r}")


@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and ``requires_grad=False`` for every parameter inside the block; restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def _resolve_settings(settings: Settings, overrides: Mapping[str, Any], where: str, extra: Sequence[str] = ()) -> RenderSettings:
    """``settings`` (``None``, a ``RenderSettings`` or a dict) with the keyword ``overrides`` applied."""
    if settings is None:
        base = RenderSettings()
    elif isinstance(settings, RenderSettings):
        base = settings
    elif isinstance(settings, Mapping):
        base = RenderSettings.from_dict(settings)
    else:
        raise TypeError(f"{where}() settings must be a RenderSettings, a dict of its fields or None; got "
                        f"{type(settings).__name__} (pass cache=... by keyword)")
    valid = RenderSettings.field_names()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {unknown}; valid: "
                        f"{sorted(valid + tuple(extra))}")
    return base.replace(**overrides) if overrides else base


@dataclass(frozen=True)
class _Plan:
    """A render's settings resolved against the model and the device."""

    settings: RenderSettings
    channels: int
    size: tuple[int, int]
    out_size: tuple[int, int]
    transforms: T.Transforms
    lr: float
    schedule: str
    redirect_steps: int
    redirect_stalled: bool
    amp: bool
    channels_last: bool
    fast_lrn: bool
    device: torch.device
    dtype: torch.dtype


def _resolve_transforms(transforms: Union[str, T.Transforms], size: tuple[int, int]) -> T.Transforms:
    if transforms == "default":
        tr = T.default_transforms(size)
    elif transforms == "none":
        tr = T.Transforms.none()
    elif transforms == "lucid":
        tr = T.Transforms()
    else:
        tr = transforms  # type: ignore[assignment]
    tr.check_size(size)
    return tr  # type: ignore[return-value]


def bf16_autocast_supported(device: Union[str, torch.device]) -> bool:
    """Whether ``mixed_precision=True`` renders in bfloat16 on ``device``: on CUDA, and on CPUs
    with native bfloat16 instructions (AVX-512 BF16 or AMX), where oneDNN's bfloat16
    convolutions are faster than float32 ones."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return True
    if dev.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(torch.backends.mkldnn.is_available() and check is not None and check())
    return False


def _plan(model: nn.Module, s: RenderSettings, device: Union[str, torch.device, None]) -> _Plan:
    mdev, dtype = device_and_dtype(model)
    dev = mdev if device is None else torch.device(device)
    channels, in_h, in_w = input_shape(model)
    size = s.size if s.size is not None else (min(128, in_h), min(128, in_w))
    out_size = s.resize_to if s.resize_to is not None else (in_h, in_w)
    amp = s.mixed_precision and bf16_autocast_supported(dev)
    channels_last = s.channels_last if s.channels_last is not None else dev.type == "cpu"
    lr, schedule = default_optimizer(size)
    lr = s.lr if s.lr is not None else lr
    schedule = s.schedule if s.schedule is not None else schedule
    fast_lrn = any(isinstance(m, nn.LocalResponseNorm) for m in model.modules())
    return _Plan(s, channels, size, out_size, _resolve_transforms(s.transforms, size), lr, schedule, s.redirect_steps(),
                 s.redirect_stalled(), amp, channels_last, fast_lrn, dev, dtype)


def _request_base(model: nn.Module, p: _Plan) -> dict:
    """The part of a cache request that every target of one :func:`render` call shares."""
    s = p.settings
    return {
        "version": _CACHE_VERSION,
        "model": state_dict_hash(model),
        "model_class": type(model).__name__,
        "param": s.param,
        "param_init": describe(s.param, s.decorrelate and p.channels == 3),
        "decorrelate": s.decorrelate and p.channels == 3,
        "transforms": p.transforms.to_dict(),
        "steps": s.steps,
        "size": list(p.size),
        "resize_to": list(p.out_size),
        "lr": p.lr,
        "schedule": p.schedule,
        "redirect_steps": p.redirect_steps,
        "redirect_stalled": p.redirect_stalled,
        "mixed_precision": p.amp,
        "dtype": str(p.dtype),
    }


def _as_objectives(targets: Union[TargetLike, Sequence[TargetLike]]) -> list[Objective]:
    single = isinstance(targets, (str, Objective)) or not isinstance(targets, Sequence)
    return [as_objective(t) for t in ([targets] if single else list(targets))]  # type: ignore[list-item]


def cache_requests(
    model: nn.Module,
    targets: Union[TargetLike, Sequence[TargetLike]],
    settings: Settings = None,
    *,
    device: Union[str, torch.device, None] = None,
    **overrides: Any,
) -> list[dict]:
    """The cache request of each target, exactly as :func:`render` with these settings stores it.

    ``FeatureVisCache.relpath(request)`` is then where the image lies in a cache folder, so a
    scheduler can tell which images exist without rendering. Takes :func:`render`'s settings
    and keyword arguments; those that do not change an image (``batch_size``, ``progress``,
    ``cache``, ``channels_last``) are accepted and ignored. ``device`` is the device the render
    will run on (only its type matters: mixed precision is CUDA-only; default the model's
    device); the dtype is the model's. Computes the model's weight hash once.
    """
    for k in ("batch_size", "progress", "cache"):
        overrides.pop(k, None)
    s = _resolve_settings(settings, overrides, "cache_requests", CALL_ARGUMENTS)
    p = _plan(model, s, device)
    base = _request_base(model, p)
    return [dict(base, objective=o.key, seed=element_seed(s.seed, o.key)) for o in _as_objectives(targets)]


def _probe(model: nn.Module, layers: Sequence[str], channels: int, out_size: tuple[int, int], device: torch.device,
           dtype: torch.dtype, channels_last: bool = False) -> tuple[dict[str, Layout], int]:
    """Layouts of the objective ``layers`` and floats of every named activation up to the
    deepest of them, plus the input, for one image."""
    x = preprocess_input(model, torch.full((1, channels, *out_size), 0.5, device=device, dtype=dtype))
    names = layer_names(model, tuple(x.shape[1:]))
    if channels_last:
        x = _channels_last(x)
    with torch.no_grad(), capture(model, names, detach=True) as everything:
        run_until(model, x, list(layers), detach=True)
    numel = sum(v.numel() for v in everything.values()) + x.numel()
    return get_layouts(model, layers, input_shape=tuple(x.shape[1:])), int(numel)


def activation_floats_per_image(model: nn.Module, layers: Union[str, Sequence[str]],
                                size: Union[int, Sequence[int], None] = None) -> int:
    """Activation floats one image produces on the way to ``layers``.

    Counts every named layer's output (:func:`circuits.layers.layer_names`) computed until the
    deepest of ``layers`` (the forward pass stops there, as in rendering) plus the input image,
    for one image fed to the model at ``size`` (an int or ``(height, width)``; default the
    model's input size). Rendering and the atlas size their batches from it (an image costs
    about ``floats x 4 bytes x 3``: activations, their gradients, workspace).

    Example:
        >>> activation_floats_per_image(FashionInception(), "mixed3a")      # doctest: +SKIP
        126224
    """
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    channels, in_h, in_w = input_shape(model)
    hw = RenderSettings(resize_to=size).resize_to or (in_h, in_w)
    dev, dtype = device_and_dtype(model)
    return _probe(model, layer_list, channels, hw, dev, dtype)[1]


def _auto_batch(per_image_floats: int, device: torch.device) -> int:
    bytes_per_image = per_image_floats * 4 * 3  # activations kept for backward + gradients
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        budget, cap = free * 0.5, 256
    else:
        budget, cap = 2 * 1024**3, 64
    return int(max(1, min(cap, budget // max(bytes_per_image, 1))))


class _Adam:
    """Adam for one tensor, the same update as ``torch.optim.Adam`` (defaults betas 0.9/0.999,
    eps 1e-8), without its per-step bookkeeping (and without importing ``torch._dynamo``)."""

    def __init__(self, tensor: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.p, self.lr, self.b1, self.b2, self.eps = tensor, lr, betas[0], betas[1], eps
        self.m = torch.zeros_like(tensor)
        self.v = torch.zeros_like(tensor)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        g = self.p.grad
        if g is None:
            return
        self.t += 1
        self.m.lerp_(g, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        bc1 = 1 - self.b1 ** self.t
        bc2 = 1 - self.b2 ** self.t
        denom = (self.v.sqrt() / math.sqrt(bc2)).add_(self.eps)
        self.p.addcdiv_(self.m, denom, value=-self.lr / bc1)
        self.p.grad = None


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x [B, C, H, W]`` copied into channels-last strides ``(H W C, 1, W C, C)``, also for
    ``C = 1``, where ``.contiguous(memory_format=torch.channels_last)`` keeps the NCHW strides
    (equally valid for one channel) and the model would then run in NCHW throughout."""
    b, c, h, w = x.shape
    out = torch.empty_strided((b, c, h, w), (h * w * c, 1, w * c, c), dtype=x.dtype, device=x.device)
    return out.copy_(x)


def _optimize(
    model: nn.Module,
    objectives: Sequence[Objective],
    seeds: Sequence[int],
    plan: _Plan,
    layouts: dict[str, Layout],
    bar: Optional[tqdm],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one batch: returns ``(images [B, C, H, W] cpu, values [B] cpu)``."""
    s, device, dtype = plan.settings, plan.device, plan.dtype
    layers = list(dict.fromkeys(l for o in objectives for l in o.layers))
    image = ImageParam(seeds, plan.channels, plan.size, kind=s.param, decorrelate=s.decorrelate, device=device, dtype=dtype)
    transforms = plan.transforms
    draws = torch.stack(
        [transforms.sample(torch.Generator().manual_seed((int(x) * 2654435761 + 97) % (2**63)), s.steps) for x in seeds],
        dim=1,
    )  # [steps, B, 6]
    thetas = transforms.matrices(draws, plan.size).to(device=device, dtype=dtype)  # [steps, B, 2, 3]
    identity = transforms == T.Transforms.none()
    opt = _Adam(image.tensor, lr=plan.lr)

    def forward(x01: torch.Tensor, amp: bool) -> torch.Tensor:
        x = preprocess_input(model, x01)
        if plan.channels_last and x.ndim == 4:
            x = _channels_last(x)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext():
            acts = run_until(model, x, layers)
        return evaluate_batch(objectives, acts, layouts).float()

    stalled = torch.zeros(len(seeds), dtype=torch.bool, device=device)
    revive = False
    with fast_ops(plan.fast_lrn):
        for step in range(s.steps):
            with redirected_relu(step < plan.redirect_steps or revive):
                img = image()
                if identity:
                    x01 = T.resize(img, plan.out_size)
                else:
                    x01 = T.apply(img, thetas[step], plan.out_size, fill=transforms.fill)
                values = forward(x01, plan.amp)
                (-values.sum()).backward()
            if plan.redirect_stalled and step >= plan.redirect_steps and (step - plan.redirect_steps) % _STALL_CHECK == 0:
                # an image with no gradient at all would only drift on Adam's momentum and then stop
                # for good: redirect (it only changes elements a ReLU cuts off completely) until its
                # objective is positive
                grad = image.tensor.grad
                no_grad = grad.flatten(1).eq(0).all(1) if grad is not None else torch.ones_like(stalled)
                stalled = (stalled | no_grad) & values.detach().le(0)
                revive = bool(stalled.any())
            opt.lr = learning_rate(step, s.steps, plan.lr, plan.schedule)
            opt.step()
            if bar is not None:
                bar.update(1)
    with torch.no_grad():
        final = image()
        values = forward(T.resize(final, plan.out_size), False)
    return final.detach().float().cpu(), values.detach().float().cpu()


def _reference_values(model: nn.Module, objectives: Sequence[Objective], reference: Reference,
                      device: torch.device) -> Union[torch.Tensor, Mapping[str, float]]:
    """Best value per target of ``reference``: given values, or the maximum over a data set."""
    if isinstance(reference, Mapping):
        return reference
    if isinstance(reference, (torch.Tensor, np.ndarray)) and np.ndim(reference) == 4:
        data: Any = torch.as_tensor(np.asarray(reference)) if isinstance(reference, np.ndarray) else reference
    elif isinstance(reference, (torch.Tensor, np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(reference, dtype=np.float32))
    else:
        data = reference  # an iterable of batches (a DataLoader)
    from .examples import objective_values

    return objective_values(model, list(objectives), data, device=device).max(dim=1).values


def render(
    model: nn.Module,
    targets: Union[TargetLike, Sequence[TargetLike]],
    settings: Settings = None,
    *,
    cache: CacheLike = None,
    progress: bool = True,
    device: Union[str, torch.device, None] = None,
    batch_size: Optional[int] = None,
    reference: Reference = None,
    **overrides: Any,
) -> RenderResult:
    """Optimise one image per target so that it maximally activates that target.

    Args:
        model: any ``nn.Module`` taking preprocessed images (:func:`circuits.models.preprocess_input`
            is applied to the ``[0, 1]`` images before the model).
        targets: a target string (``"mixed4a:476"``, ``"logits:3"``, ``"mixed4a:2@3,3"``), an
            :class:`~circuits.featurevis.objectives.Objective`, or a list of them; one image each.
        settings: a :class:`~circuits.featurevis.settings.RenderSettings` (or a dict of its
            fields); default ``RenderSettings()``.
        cache: ``None`` (no cache), ``True`` (default folder), a folder, or a
            :class:`FeatureVisCache`; images already there are not optimised again.
        progress: tqdm bar over all steps.
        device: must be the model's device (default: the model's device).
        batch_size: images optimised together; default: as many as fit a memory budget
            (half the free GPU memory; 2 GiB on CPU, at most 64). Results do not depend on it.
        reference: what the images are compared with: a data set (``[M, C, H, W]`` images in
            ``[0, 1]`` or an iterable of such batches), or the best data value per target
            (``[N]`` values or ``{target key: value}``). Fills ``beats_data`` and ``data_best``
            of the result and warns (:class:`RenderWarning`) for images that do not beat it.
        **overrides: :class:`RenderSettings` fields (``steps=256``, ``seed=1``, ``lr=0.1`` ...)
            applied on top of ``settings``; an unknown name is a ``TypeError`` naming the valid ones.

    Returns:
        :class:`RenderResult` with ``images [N, C, H, W]`` on the CPU.

    Raises:
        FloatingPointError: an optimisation produced a non-finite objective value (the finite
            images of the call are cached first).

    Example:
        >>> result = render(model, ["mixed4a:476", "mixed4a:477"], steps=256)   # doctest: +SKIP
        >>> result.images.shape                                                # doctest: +SKIP
        torch.Size([2, 3, 128, 128])
    """
    s = _resolve_settings(settings, overrides, "render", CALL_ARGUMENTS + ("reference",))
    objectives = _as_objectives(targets)
    if not objectives:
        raise ValueError("render needs at least one target")
    mdev, _ = device_and_dtype(model)
    dev = mdev if device is None else torch.device(device)
    if dev.type != mdev.type or (dev.index is not None and mdev.index is not None and dev.index != mdev.index):
        raise ValueError(f"device {dev} differs from the model's device {mdev}; move the model with model.to({str(dev)!r})")
    plan = _plan(model, s, mdev)
    if plan.channels not in (1, 3):
        raise ValueError(f"model input has {plan.channels} channels; feature visualization supports 1 or 3")
    if s.mixed_precision and not plan.amp:
        warnings.warn(f"mixed_precision: no bfloat16 support on {plan.device}; rendering in the model's dtype", stacklevel=2)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    layers = list(dict.fromkeys(l for o in objectives for l in o.layers))
    try:
        layouts, per_image = _probe(model, layers, plan.channels, plan.out_size, plan.device, plan.dtype, plan.channels_last)
    except RuntimeError:
        if not plan.channels_last or s.channels_last:
            raise
        # automatic channels-last, and the model cannot take it (e.g. ``.view`` on a conv output)
        plan = dataclasses.replace(plan, channels_last=False)
        layouts, per_image = _probe(model, layers, plan.channels, plan.out_size, plan.device, plan.dtype)
    for o in objectives:
        o.validate(layouts)

    keys = [o.key for o in objectives]
    seeds = [element_seed(s.seed, k) for k in keys]
    n = len(objectives)
    images: list[Optional[torch.Tensor]] = [None] * n
    values = torch.zeros(n)
    from_cache = [False] * n

    store = as_cache(cache)
    requests: list[dict] = []
    if store is not None:
        base = _request_base(model, plan)
        for i in range(n):
            req = dict(base, objective=keys[i], seed=seeds[i])
            requests.append(req)
            hit = store.get(req)
            if hit is not None and math.isfinite(hit[1]):
                images[i] = torch.from_numpy(hit[0])
                values[i] = hit[1]
                from_cache[i] = True

    todo = [i for i in range(n) if images[i] is None]
    diverged: list[str] = []
    if todo:
        bs = batch_size if batch_size is not None else _auto_batch(per_image, plan.device)
        chunks = [todo[j:j + bs] for j in range(0, len(todo), bs)]
        bar = tqdm(total=s.steps * len(chunks), desc=f"featurevis {len(todo)} image(s)", disable=not progress, leave=False)
        try:
            with _frozen_eval(model):
                for chunk in chunks:
                    imgs, vals = _optimize(model, [objectives[i] for i in chunk], [seeds[i] for i in chunk], plan, layouts, bar)
                    for j, i in enumerate(chunk):
                        images[i] = imgs[j]
                        values[i] = vals[j]
                        if not (math.isfinite(float(vals[j])) and bool(torch.isfinite(imgs[j]).all())):
                            diverged.append(keys[i])
                        elif store is not None:
                            store.put(requests[i], imgs[j].numpy(), float(vals[j]))
        finally:
            bar.close()
    if diverged:
        raise FloatingPointError(
            f"feature visualization diverged (non-finite objective value) for {len(diverged)} target(s): "
            f"{diverged[:8]}{' ...' if len(diverged) > 8 else ''}; try a smaller lr or fewer steps"
        )

    result = RenderResult(
        images=torch.stack(images),  # type: ignore[arg-type]
        objective_values=values,
        targets=keys,
        seeds=seeds,
        from_cache=from_cache,
        settings=s,
    )
    if reference is not None:
        result.compare_with_data(_reference_values(model, objectives, reference, plan.device))
    return result


def variable_names(
    model: nn.Module,
    targets: Sequence[TargetLike],
    settings: Settings = None,
    *,
    cache: CacheLike = True,
    progress: bool = True,
    device: Union[str, torch.device, None] = None,
    batch_size: Optional[int] = None,
    **overrides: Any,
) -> dict[str, np.ndarray]:
    """Feature visualizations for many targets, rendered once and cached.

    ``variable_names(model, [f"mixed4a:{i}" for i in range(200)])`` renders only the images
    not yet in the cache (the default folder ``circuits.models.cache_dir()/"featurevis"``),
    in batches, and returns ``{target: image}`` with images ready for ``plt.imshow``:
    ``[H, W, 3]`` float32 in ``[0, 1]``, or ``[H, W]`` for one-channel models. Keys are the
    target strings as given (objectives: their ``.key``). ``settings`` and ``overrides`` as
    in :func:`render`.
    """
    if isinstance(targets, (str, Objective)):
        targets = [targets]
    s = _resolve_settings(settings, overrides, "variable_names", CALL_ARGUMENTS)
    result = render(model, list(targets), s, cache=cache, progress=progress, device=device, batch_size=batch_size)
    names = [t if isinstance(t, str) else as_objective(t).key for t in targets]
    return {name: _to_display(result.images[i].numpy()) for i, name in enumerate(names)}
