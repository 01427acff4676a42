"""Models: InceptionV1 with Lucid's names, the project's trained Fashion-MNIST model,
any torchvision classifier by name, and weight loading.

Input convention (the one documented place): every model's ``forward`` takes images that
have gone through :func:`preprocess_input`, which maps pixels in ``[0, 1]`` to what the
model was trained on (InceptionV1: ``x * 255 - 117``; FashionInception: standardised with
the data set's mean and std; torchvision models: ImageNet mean/std). Feature visualization,
dataset examples and activation plots all go through this function.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .fashion import FASHION_CLASSES, FashionInception
from .inceptionv1 import INCEPTION5H_URL, InceptionV1
from .loading import (
    WeightsError,
    cache_dir,
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
    "available_models",
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


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_models() -> list[str]:
    """Names :func:`load_model` accepts: the bundled models, then torchvision classifiers."""
    return ["fashion-inception", "inceptionv1"] + _torchvision_names()


def _imagenet_preprocess(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(_IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


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
            (random init unless ``weights`` is given, e.g. ``inception5h.pth``), or any
            torchvision classification model name (``"resnet18"``...; random init unless
            ``weights``).
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
    else:
        tv_names = _torchvision_names()
        if name not in tv_names:
            close = difflib.get_close_matches(name, ["fashion-inception", "inceptionv1"] + tv_names, n=5)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UnknownModelError(
                f"unknown model {name!r}.{hint} Use 'fashion-inception', 'inceptionv1', a torchvision "
                "classifier name, or a weights file with --model NAME --weights FILE"
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


def input_shape(model: nn.Module, default: tuple[int, int, int] = (3, 224, 224)) -> tuple[int, int, int]:
    """One example's input shape ``(C, H, W)``: ``model.input_shape`` when set, else ``default``."""
    shape = getattr(model, "input_shape", None)
    return tuple(shape) if shape is not None else default  # type: ignore[return-value]
