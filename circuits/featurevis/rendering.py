"""Render feature visualizations ("variable names") for many targets at once.

``render(model, ["mixed4a:0", "mixed4a:1", ...])`` optimises one image per target, all in one
batch (chunked to a memory budget): each batch element has its own objective, its own
random initialisation and its own random transforms, all derived from ``(seed, target)``, so
an image never depends on the other targets in its batch, on the chunking, or on whether it
came from the cache. (Exactly so for float64 models on the CPU; in float32, oneDNN's
convolutions round differently for different batch sizes, and ties in max pools over the
constant padding can route a gradient differently, so images agree closely, not bitwise.)
The images and the optimisation use the model's floating dtype. The forward pass stops right after the deepest layer any objective
reads (:func:`circuits.layers.run_until`), and the model's parameters are frozen during the
optimisation so that the backward pass computes only the image gradient.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._io import state_dict_hash
from ..layers import capture, layer_names, run_until
from ..layouts import Layout, get_layouts
from ..models import input_shape, preprocess_input
from . import transforms as T
from .cache import FeatureVisCache, as_cache
from .objectives import Objective, as_objective, evaluate_batch
from .param import ImageParam
from .relu import redirected_relu

__all__ = ["render", "variable_names", "cache_requests", "RenderResult", "element_seed", "REDIRECT_STEPS"]

#: Steps at the start of an optimisation during which the redirected ReLU is used.
REDIRECT_STEPS = 16
_CACHE_VERSION = 1

TargetLike = Union[str, Objective]


@dataclass
class RenderResult:
    """Rendered images and what they reached.

    Attributes:
        images: ``[N, C, H, W]`` float32 in ``[0, 1]`` on the CPU.
        objective_values: ``[N]`` objective of each final image, evaluated on the image
            without random transforms (only resized to the model's input size).
        targets: ``N`` target keys (``"mixed4a:476"``, ``"direction(...)"``).
        seeds: the per-image seed actually used (derived from ``seed`` and the target).
        from_cache: whether each image came from the cache.
    """

    images: torch.Tensor
    objective_values: torch.Tensor
    targets: list[str]
    seeds: list[int] = field(default_factory=list)
    from_cache: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` for ``plt.imshow``: ``[H, W, 3]``, or ``[H, W]`` for one channel."""
        return _to_display(self.images[i].numpy())


def _to_display(chw: np.ndarray) -> np.ndarray:
    return chw[0] if chw.shape[0] == 1 else np.transpose(chw, (1, 2, 0))


def element_seed(seed: int, key: str) -> int:
    """The seed of one image: a 63-bit hash of ``(seed, target key)``."""
    return int(hashlib.sha256(f"{int(seed)}|{key}".encode()).hexdigest()[:15], 16)


def _model_device(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first parameter (or buffer)."""
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    if p is None:
        return torch.device("cpu"), torch.float32
    return p.device, (p.dtype if p.is_floating_point() else torch.float32)


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


def _pair(size: Union[int, Sequence[int]], what: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        s = (int(size), int(size))
    else:
        s = tuple(int(v) for v in size)  # type: ignore[assignment]
        if len(s) != 2:
            raise ValueError(f"{what} must be an int or (height, width), got {size!r}")
    if min(s) < 1:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return s  # type: ignore[return-value]


def _resolve_transforms(transforms: object, size: tuple[int, int]) -> T.Transforms:
    if transforms is None or transforms == "default":
        tr = T.default_transforms(size)
    elif transforms is False or transforms == "none":
        tr = T.Transforms.none()
    elif transforms == "lucid":
        tr = T.Transforms()
    elif isinstance(transforms, T.Transforms):
        tr = transforms
    elif isinstance(transforms, dict):
        tr = T.Transforms(**transforms)
    else:
        raise TypeError(
            f"transforms must be None/'default', 'lucid', 'none', a dict or a Transforms; got {transforms!r}"
        )
    tr.check_size(size)
    return tr


def _request_base(
    model: nn.Module, *, channels: int, size: tuple[int, int], out_size: tuple[int, int], param: str,
    decorrelate: bool, transforms: T.Transforms, steps: int, lr: float, redirect_steps: int, amp: bool,
    dtype: torch.dtype,
) -> dict:
    """The part of a cache request that every target of one :func:`render` call shares."""
    return {
        "version": _CACHE_VERSION,
        "model": state_dict_hash(model),
        "model_class": type(model).__name__,
        "param": param,
        "decorrelate": bool(decorrelate) and channels == 3,
        "transforms": transforms.to_dict(),
        "steps": steps,
        "size": list(size),
        "resize_to": list(out_size),
        "lr": float(lr),
        "redirect_steps": redirect_steps,
        "mixed_precision": amp,
        "dtype": str(dtype),
    }


def _geometry(model: nn.Module, size: object, resize_to: object, transforms: object) -> tuple[int, tuple[int, int], tuple[int, int], T.Transforms]:
    """``(input channels, parameterized size, size fed to the model, transforms)`` of a render."""
    channels, in_h, in_w = input_shape(model)
    size_hw = _pair(size, "size") if size is not None else (min(128, in_h), min(128, in_w))  # type: ignore[arg-type]
    out_size = _pair(resize_to, "resize_to") if resize_to is not None else (in_h, in_w)  # type: ignore[arg-type]
    return channels, size_hw, out_size, _resolve_transforms(transforms, size_hw)


def _redirect_steps(redirected_relu: Union[bool, int]) -> int:
    return REDIRECT_STEPS if redirected_relu is True else (0 if redirected_relu is False else int(redirected_relu))


#: :func:`render` arguments that do not change an image (so not its cache request).
_NOT_IN_REQUEST = frozenset({"batch_size", "progress", "cache", "channels_last"})


def cache_requests(
    model: nn.Module,
    targets: Union[TargetLike, Sequence[TargetLike]],
    *,
    steps: int = 512,
    size: Union[int, Sequence[int], None] = None,
    param: str = "fft",
    decorrelate: bool = True,
    seed: int = 0,
    transforms: object = None,
    lr: float = 0.05,
    redirected_relu: Union[bool, int] = True,
    device: Union[str, torch.device, None] = None,
    mixed_precision: bool = False,
    resize_to: Union[int, Sequence[int], None] = None,
    **render_only: object,
) -> list[dict]:
    """The cache request of each target, exactly as :func:`render` with these arguments stores it.

    ``FeatureVisCache.relpath(request)`` is then where the image lies in a cache folder, so a
    scheduler can tell which images exist without rendering. Takes :func:`render`'s keyword
    arguments; those that do not change the image (``batch_size``, ``progress``, ``cache``,
    ``channels_last``) are accepted and ignored. ``device`` is the device the render will run
    on (only its type matters: mixed precision is CUDA-only; default the model's device); the
    dtype is the model's. Computes the model's weight hash once.
    """
    unknown = sorted(set(render_only) - _NOT_IN_REQUEST)
    if unknown:
        raise TypeError(f"cache_requests() got unexpected keyword argument(s) {unknown}; "
                        f"it takes render()'s arguments")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    single = isinstance(targets, (str, Objective)) or not isinstance(targets, Sequence)
    objectives = [as_objective(t) for t in ([targets] if single else list(targets))]  # type: ignore[list-item]
    mdev, dtype = _model_device(model)
    dev = mdev if device is None else torch.device(device)
    channels, size_hw, out_size, tr = _geometry(model, size, resize_to, transforms)
    base = _request_base(
        model, channels=channels, size=size_hw, out_size=out_size, param=param, decorrelate=decorrelate,
        transforms=tr, steps=steps, lr=lr,
        redirect_steps=_redirect_steps(redirected_relu), amp=bool(mixed_precision) and dev.type == "cuda",
        dtype=dtype,
    )
    return [dict(base, objective=o.key, seed=element_seed(seed, o.key)) for o in objectives]


def _probe(model: nn.Module, layers: Sequence[str], channels: int, out_size: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Layout], int]:
    """Layouts of the objective layers and floats of activations per image."""
    x = preprocess_input(model, torch.full((1, channels, *out_size), 0.5, device=device, dtype=dtype))
    names = layer_names(model, tuple(x.shape[1:]))
    with torch.no_grad(), capture(model, names, detach=True) as everything:
        run_until(model, x, list(layers), detach=True)
    numel = sum(v.numel() for v in everything.values()) + x.numel()
    return get_layouts(model, layers, input_shape=tuple(x.shape[1:])), numel


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


def _optimize(
    model: nn.Module,
    objectives: Sequence[Objective],
    seeds: Sequence[int],
    *,
    channels: int,
    size: tuple[int, int],
    out_size: tuple[int, int],
    param: str,
    decorrelate: bool,
    transforms: T.Transforms,
    steps: int,
    lr: float,
    redirect_steps: int,
    device: torch.device,
    dtype: torch.dtype,
    amp: bool,
    channels_last: bool,
    layouts: dict[str, Layout],
    bar: Optional[tqdm],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimise one batch: returns ``(images [B, C, H, W] cpu, values [B] cpu)``."""
    layers = list(dict.fromkeys(l for o in objectives for l in o.layers))
    image = ImageParam(seeds, channels, size, kind=param, decorrelate=decorrelate, device=device, dtype=dtype)
    draws = torch.stack(
        [transforms.sample(torch.Generator().manual_seed((int(s) * 2654435761 + 97) % (2**63)), steps) for s in seeds],
        dim=1,
    )  # [steps, B, 6]
    thetas = transforms.matrices(draws, size).to(device=device, dtype=dtype)  # [steps, B, 2, 3]
    identity = transforms == T.Transforms.none()
    opt = _Adam(image.tensor, lr=lr)
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def forward(x01: torch.Tensor) -> torch.Tensor:
        x = preprocess_input(model, x01)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            acts = run_until(model, x, layers)
        return evaluate_batch(objectives, acts, layouts).float()

    for step in range(steps):
        with redirected_relu(step < redirect_steps):
            img = image()
            if identity:
                x01 = T.resize(img, out_size)
            else:
                x01 = T.apply(img, thetas[step], out_size, fill=transforms.fill)
            loss = -forward(x01).sum()
            loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
    with torch.no_grad():
        final = image()
        values = forward(T.resize(final, out_size))
    return final.detach().float().cpu(), values.detach().float().cpu()


def render(
    model: nn.Module,
    targets: Union[TargetLike, Sequence[TargetLike]],
    *,
    steps: int = 512,
    size: Union[int, Sequence[int], None] = None,
    param: str = "fft",
    decorrelate: bool = True,
    seed: int = 0,
    batch_size: Optional[int] = None,
    transforms: object = None,
    lr: float = 0.05,
    redirected_relu: Union[bool, int] = True,
    device: Union[str, torch.device, None] = None,
    progress: bool = True,
    cache: Union[None, bool, str, FeatureVisCache] = None,
    mixed_precision: bool = False,
    resize_to: Union[int, Sequence[int], None] = None,
    channels_last: bool = False,
) -> RenderResult:
    """Optimise one image per target so that it maximally activates that target.

    Args:
        model: any ``nn.Module`` taking preprocessed images (:func:`circuits.models.preprocess_input`
            is applied to the ``[0, 1]`` images before the model).
        targets: a target string (``"mixed4a:476"``, ``"logits:3"``, ``"mixed4a:2@3,3"``), an
            :class:`~circuits.featurevis.objectives.Objective`, or a list of them; one image each.
        steps: Adam steps.
        size: side of the parameterized image; default ``min(128, model input side)``
            (128 for InceptionV1, 28 for FashionInception).
        param: ``"fft"`` (Fourier + colour decorrelation + sigmoid, Lucid's look) or ``"pixel"``.
        decorrelate: colour decorrelation (3-channel models only).
        seed: base seed; image ``i`` uses :func:`element_seed` ``(seed, target key)``.
        batch_size: images optimised together; default: as many as fit a memory budget
            (half the free GPU memory; 2 GiB on CPU, at most 64). Results do not depend on it.
        transforms: ``None`` (:func:`~circuits.featurevis.transforms.default_transforms` for the
            size), ``"lucid"``, ``"none"``, a dict of :class:`Transforms` fields or a ``Transforms``.
        lr: Adam learning rate.
        redirected_relu: use the redirected ReLU for the first 16 steps (``True``), not at all
            (``False``) or for that many steps (an int).
        device: must be the model's device (default: the model's device).
        progress: tqdm bar over all steps.
        cache: ``None`` (no cache), ``True`` (default folder), a folder, or a
            :class:`FeatureVisCache`; images already there are not optimised again.
        mixed_precision: bfloat16 autocast for the forward pass (CUDA only; ignored on CPU).
        resize_to: size the transformed image is resampled to before the model; default the
            model's input size (224 for InceptionV1 — Lucent does the same — 28 for FashionInception).
        channels_last: run the model on channels-last tensors (can be faster on GPU).

    Returns:
        :class:`RenderResult` with ``images [N, C, H, W]`` on the CPU.
    """
    single = isinstance(targets, (str, Objective)) or not isinstance(targets, Sequence)
    target_list = [targets] if single else list(targets)  # type: ignore[list-item]
    if not target_list:
        raise ValueError("render needs at least one target")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    objectives = [as_objective(t) for t in target_list]  # type: ignore[arg-type]
    mdev, dtype = _model_device(model)
    dev = mdev if device is None else torch.device(device)
    if dev.type != mdev.type or (dev.index is not None and mdev.index is not None and dev.index != mdev.index):
        raise ValueError(f"device {dev} differs from the model's device {mdev}; move the model with model.to({str(dev)!r})")
    dev = mdev
    channels = input_shape(model)[0]
    if channels not in (1, 3):
        raise ValueError(f"model input has {channels} channels; feature visualization supports 1 or 3")
    channels, size_hw, out_size, tr = _geometry(model, size, resize_to, transforms)
    redirect_steps = _redirect_steps(redirected_relu)
    amp = bool(mixed_precision) and dev.type == "cuda"
    if mixed_precision and not amp:
        warnings.warn("mixed_precision is only used on CUDA devices; rendering in float32", stacklevel=2)

    layers = list(dict.fromkeys(l for o in objectives for l in o.layers))
    layouts, per_image = _probe(model, layers, channels, out_size, dev, dtype)
    for o in objectives:
        o.validate(layouts)

    keys = [o.key for o in objectives]
    seeds = [element_seed(seed, k) for k in keys]
    n = len(objectives)
    images: list[Optional[torch.Tensor]] = [None] * n
    values = torch.zeros(n)
    from_cache = [False] * n

    store = as_cache(cache)
    requests: list[dict] = []
    if store is not None:
        base = _request_base(
            model, channels=channels, size=size_hw, out_size=out_size, param=param, decorrelate=decorrelate,
            transforms=tr, steps=steps, lr=lr, redirect_steps=redirect_steps, amp=amp, dtype=dtype,
        )
        for i in range(n):
            req = dict(base, objective=keys[i], seed=seeds[i])
            requests.append(req)
            hit = store.get(req)
            if hit is not None:
                images[i] = torch.from_numpy(hit[0])
                values[i] = hit[1]
                from_cache[i] = True

    todo = [i for i in range(n) if images[i] is None]
    if todo:
        bs = batch_size if batch_size is not None else _auto_batch(per_image, dev)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        chunks = [todo[j:j + bs] for j in range(0, len(todo), bs)]
        bar = tqdm(total=steps * len(chunks), desc=f"featurevis {len(todo)} image(s)", disable=not progress, leave=False)
        try:
            with _frozen_eval(model):
                for chunk in chunks:
                    imgs, vals = _optimize(
                        model, [objectives[i] for i in chunk], [seeds[i] for i in chunk],
                        channels=channels, size=size_hw, out_size=out_size, param=param,
                        decorrelate=decorrelate, transforms=tr, steps=steps, lr=lr,
                        redirect_steps=redirect_steps, device=dev, dtype=dtype, amp=amp,
                        channels_last=channels_last, layouts=layouts, bar=bar,
                    )
                    for j, i in enumerate(chunk):
                        images[i] = imgs[j]
                        values[i] = vals[j]
                        if store is not None:
                            store.put(requests[i], imgs[j].numpy(), float(vals[j]))
        finally:
            bar.close()

    return RenderResult(
        images=torch.stack(images),  # type: ignore[arg-type]
        objective_values=values,
        targets=keys,
        seeds=seeds,
        from_cache=from_cache,
    )


def variable_names(
    model: nn.Module,
    targets: Sequence[TargetLike],
    cache: Union[None, bool, str, FeatureVisCache] = True,
    **render_kwargs: object,
) -> dict[str, np.ndarray]:
    """Feature visualizations for many targets, rendered once and cached.

    ``variable_names(model, [f"mixed4a:{i}" for i in range(200)])`` renders only the images
    not yet in the cache (the default folder ``circuits.models.cache_dir()/"featurevis"``),
    in batches, and returns ``{target: image}`` with images ready for ``plt.imshow``:
    ``[H, W, 3]`` float32 in ``[0, 1]``, or ``[H, W]`` for one-channel models. Keys are the
    target strings as given (objectives: their ``.key``).
    """
    if isinstance(targets, (str, Objective)):
        targets = [targets]
    result = render(model, list(targets), cache=cache, **render_kwargs)  # type: ignore[arg-type]
    names = [t if isinstance(t, str) else as_objective(t).key for t in targets]
    return {name: _to_display(result.images[i].numpy()) for i, name in enumerate(names)}

