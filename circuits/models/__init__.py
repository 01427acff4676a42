"""Models: InceptionV1 with Lucid's names, the project's trained Fashion-MNIST model,
any torchvision classifier by name, ``timm`` models (optional), and weight loading.

:func:`resolve_model` is the one way every entry point (CLI, configs, atlas, inspection) turns
what a user names — a model, a name, a weights file or a URL — into a model.

Input convention (the one documented place): every model's ``forward`` takes images that
have gone through :func:`preprocess_input`, which maps pixels in ``[0, 1]`` to what the
model was trained on (InceptionV1: ``x * 255 - 117``; FashionInception: standardised with
the data set's mean and std; torchvision models: ImageNet mean/std). Feature visualization,
dataset examples and activation plots all go through this function.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .fashion import FASHION_CLASSES, FashionInception
from .inceptionv1 import INCEPTION5H_URL, InceptionV1
from .checkpoint import (
    CheckpointFormatError,
    CheckpointReader,
    UnsafeCheckpointError,
    flatten_state_dict,
    read_checkpoint,
    sniff_checkpoint,
)
from .loading import (
    WEIGHT_SUFFIXES,
    DeviceError,
    WeightsError,
    cache_dir,
    check_device,
    check_state_dict,
    fetch_url,
    load_state_dict_file,
    load_weights,
    save_state_dict,
)

__all__ = [
    "InceptionV1",
    "FashionInception",
    "FASHION_CLASSES",
    "INCEPTION5H_URL",
    "WeightsError",
    "cache_dir",
    "check_state_dict",
    "fetch_url",
    "load_state_dict_file",
    "load_weights",
    "save_state_dict",
    "load_model",
    "resolve_model",
    "available_models",
    "device_and_dtype",
    "UnknownModelError",
    "WEIGHT_SUFFIXES",
    "CheckpointReader",
    "read_checkpoint",
    "flatten_state_dict",
    "sniff_checkpoint",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "check_device",
    "DeviceError",
    "preprocess_input",
    "input_shape",
    "DEFAULT_MODEL",
    "FASHION_WEIGHTS",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
FASHION_WEIGHTS = WEIGHTS_DIR / "fashion_inception.safetensors"
DEFAULT_MODEL = "fashion-inception"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class UnknownModelError(ValueError):
    """A model name that is neither bundled nor a torchvision classifier."""


def _timm_model(name: str) -> nn.Module:
    """A ``timm`` model with random init (``timm:<name>``); preprocessing from its pretrained config."""
    try:
        import timm
    except ImportError:
        raise UnknownModelError(
            f"'timm:{name}' needs the optional package timm: pip install timm (or circuits[timm])"
        ) from None
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" Did you mean: {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UnknownModelError(f"unknown timm model {name!r}.{hint}")
    model = timm.create_model(name, pretrained=False)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    mean = tuple(cfg.get("mean") or _IMAGENET_MEAN)
    std = tuple(cfg.get("std") or _IMAGENET_STD)
    model.preprocess_input = _Normalize(mean, std)  # type: ignore[assignment]
    model.input_shape = tuple(int(v) for v in (cfg.get("input_size") or (3, 224, 224)))  # type: ignore[assignment]
    return model


class _Normalize:
    """``(x - mean) / std`` per colour channel; a picklable callable (models travel to Ray workers)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Names :func:`load_model` accepts: the bundled models, then torchvision classifiers
    (and any ``timm:<name>`` when timm is installed, not listed here)."""
    return ["fashion-inception", "inceptionv1"] + _torchvision_names()


_imagenet_preprocess = _Normalize(_IMAGENET_MEAN, _IMAGENET_STD)


def load_model(
    name: str = DEFAULT_MODEL,
    weights: Optional[Union[str, Path]] = None,
    sha256: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    lrn: str = "tf",
) -> nn.Module:
    """Build a model by name (or from a weights file alone) in eval mode on ``device``.

    Args:
        name: ``"fashion-inception"`` (the trained default, weights bundled), ``"inceptionv1"``
            (random init unless ``weights`` is given, e.g. ``inception5h.pth``), any
            torchvision classification model name (``"resnet18"``...; random init unless
            ``weights``), or ``"timm:<name>"`` (``"timm:convnext_tiny"``; needs the optional
            ``timm`` package; random init unless ``weights``, never downloaded).
        weights: local ``.pth``/``.pt``/``.safetensors`` file or an ``https://`` URL (then
            ``sha256`` is required). Loaded strictly: every key and shape must match.
        sha256: expected digest of the weights file.
        device: where the model goes.
        lrn: InceptionV1 only: ``"tf"`` (correct constants) or ``"lucent"``.

    Example:
        >>> model = load_model()                       # trained Fashion-MNIST model
        >>> model = load_model("inceptionv1", weights="inception5h.pth")  # doctest: +SKIP
    """
    key = name.lower().replace("_", "-")
    if key in ("fashion-inception", "fashion"):
        model: nn.Module = FashionInception()
        if weights is None:
            if not FASHION_WEIGHTS.is_file():
                raise WeightsError(
                    f"the bundled checkpoint {FASHION_WEIGHTS} is missing; reinstall circuits or run "
                    "experiments/train_fashion.py"
                )
            weights = FASHION_WEIGHTS
    elif key in ("inceptionv1", "inception5h", "googlenet-lucid"):
        model = InceptionV1(lrn=lrn)
    elif name.startswith("timm:"):
        model = _timm_model(name[len("timm:"):])
    else:
        tv_names = _torchvision_names()
        if name not in tv_names:
            close = difflib.get_close_matches(name, ["fashion-inception", "inceptionv1"] + tv_names, n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownModelError(
                f"unknown model {name!r}.{hint} Use 'fashion-inception', 'inceptionv1', a torchvision "
                "classifier name, 'timm:<name>', or a weights file with --model NAME --weights FILE"
            )
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        model.preprocess_input = _imagenet_preprocess  # type: ignore[assignment]
        model.input_shape = (3, 224, 224)  # type: ignore[assignment]
    if weights is not None:
        load_weights(model, weights, sha256=sha256)
    return model.to(device).eval()


def preprocess_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Map images ``[batch, C, H, W]`` with pixels in ``[0, 1]`` to ``model``'s input convention.

    Uses ``model.preprocess_input`` when the model defines it (all models from
    :func:`load_model` do); otherwise the images are passed through unchanged.
    """
    fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = getattr(model, "preprocess_input", None)
    return fn(x) if callable(fn) else x


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """One example's input shape ``(C, H, W)``: ``model.input_shape`` when set (every model from
    :func:`load_model` sets it), else what the model states about itself (torchvision ViT's
    ``image_size``, timm's ``patch_embed.img_size`` / ``pretrained_cfg["input_size"]``), else
    224 × 224 with the first convolution's input channels (3 without one)."""
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(int(v) for v in shape)
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first_conv.in_channels if first_conv is not None else 3
    size = getattr(model, "image_size", None)  # torchvision VisionTransformer
    if isinstance(size, int):
        return (channels, size, size)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)  # timm ViT-style models
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (channels, *size)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size", ())) == 3:
        return tuple(int(v) for v in cfg["input_size"])
    return (channels, 224, 224)


def device_and_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where ``model`` computes and in which floating dtype: its first floating parameter's
    device and dtype (without parameters: its first floating buffer's; without either: CPU,
    float32)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        p = next((b for b in model.buffers() if b.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _is_file_spec(spec: str) -> bool:
    """Whether ``--model`` names a weights file or URL rather than an architecture."""
    if "://" in spec:
        return True
    if spec.startswith("timm:"):
        return False
    return Path(spec).suffix.lower() in WEIGHT_SUFFIXES or os.sep in spec or "/" in spec or Path(spec).exists()


#: Architectures :func:`resolve_model` recognises from a weights file alone.
_RECOGNISED = (("fashion-inception", FashionInception), ("inceptionv1", InceptionV1))


def resolve_model(
    model: Union[str, os.PathLike, nn.Module] = DEFAULT_MODEL,
    weights: Optional[Union[str, os.PathLike]] = None,
    sha256: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
) -> nn.Module:
    """Turn what a user names into a model in eval mode on ``device``.

    The one resolver behind the CLI's ``--model/--weights/--sha256``, experiment configs, the
    atlas and inspection.

    Args:
        model: an ``nn.Module`` (returned, with ``weights`` loaded into it when given); a name
            (see :func:`load_model`: ``"fashion-inception"``, ``"inceptionv1"``, ``"resnet50"``,
            ``"timm:convnext_tiny"``); or a weights file / ``https://`` URL alone, whose
            architecture is recognised from its keys and shapes (the bundled architectures).
        weights: weights for a named architecture (file or URL).
        sha256: expected digest of the weights (required for URLs).
        device: where the model goes.

    A weights file is read (and hashed) once. Raises :class:`WeightsError` for a file that
    is unreadable or fits no known architecture, :class:`UnknownModelError` for an unknown
    name (with close matches), ``ValueError`` when a file is given twice.

    Example:
        >>> model = resolve_model("fashion-inception")
        >>> model = resolve_model("inception5h.pth")        # doctest: +SKIP
    """
    device = check_device(device)
    if isinstance(model, nn.Module):
        if weights is not None:
            load_weights(model, weights, sha256=sha256)
        return model.to(device).eval()
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a name, a weights file or an nn.Module; got {type(model).__name__}")
    spec = os.fspath(model)
    if not _is_file_spec(spec):
        return load_model(spec, weights=weights, sha256=sha256, device=device)
    if weights is not None:
        raise ValueError(
            f"--model {spec} is a weights file; give the architecture's name with --model and the file with --weights"
        )
    state = load_state_dict_file(spec, sha256)
    for name, cls in _RECOGNISED:
        candidate = cls()
        try:
            check_state_dict(candidate, state, spec)
        except WeightsError:
            continue
        candidate.load_state_dict(state, strict=True)
        return candidate.to(device).eval()
    names = ", ".join(n for n, _ in _RECOGNISED)
    raise WeightsError(
        f"{spec} fits none of the architectures recognised from weights alone ({names}); for another "
        f"architecture pass --model NAME --weights {spec} (NAME: e.g. a torchvision model such as resnet18)"
    )
