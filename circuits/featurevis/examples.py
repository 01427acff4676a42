"""Dataset examples: the second kind of variable name — the inputs that activate a target most.

:func:`dataset_examples` streams a data set through the model once (stopping after the deepest
layer any target reads), keeps a running top-k per target, and returns the indices and
activation values of the ``k`` strongest images for every target. :func:`objective_values`
returns the full ``[targets, images]`` matrix when all values are wanted.

Activations are read through each layer's :class:`~circuits.layouts.Layout` (detected once
per model and image size, :func:`circuits.layouts.get_layouts`): a channel is the feature
axis and a position one on the spatial or patch grid, for CNNs, channels-last stages and
ViT blocks alike (the class and register tokens are not positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import run_until
from ..layouts import Layout, get_layouts
from ..models import device_and_dtype, preprocess_input
from .objectives import Objective, as_objective

__all__ = ["DatasetExamples", "dataset_examples", "objective_values"]

TargetLike = Union[str, Objective]
Data = Union[torch.Tensor, Iterable]


@dataclass
class DatasetExamples:
    """Top-``k`` data set images for one target, strongest first.

    Attributes:
        target: the target key.
        indices: ``[k]`` int64 positions in the data set (order of iteration).
        values: ``[k]`` float32 objective values of those images.
    """

    target: str
    indices: torch.Tensor
    values: torch.Tensor


def _batches(data: Data, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        if data.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W] with pixels in [0, 1], got shape {tuple(data.shape)}")
        for i in range(0, data.shape[0], batch_size):
            yield data[i:i + batch_size]
        return
    for batch in data:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        elif isinstance(batch, dict):
            batch = batch.get("image", batch.get("images"))
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise ValueError("each batch must be a [B, C, H, W] tensor of [0, 1] images (or a tuple whose first item is)")
        yield batch


def _objectives(targets: Union[TargetLike, Sequence[TargetLike]]) -> tuple[list[str], list[Objective]]:
    items = [targets] if isinstance(targets, (str, Objective)) else list(targets)
    if not items:
        raise ValueError("at least one target is needed")
    objs = [as_objective(t) for t in items]  # type: ignore[arg-type]
    names = [t if isinstance(t, str) else o.key for t, o in zip(items, objs)]
    return names, objs


def _scan(model: nn.Module, objs: list[Objective], data: Data, batch_size: int, device: Optional[torch.device], progress: bool) -> Iterator[torch.Tensor]:
    """Yield ``[targets, batch]`` objective values for successive batches."""
    layers = list(dict.fromkeys(l for o in objs for l in o.layers))
    if device is None:
        device, _ = device_and_dtype(model)
    total = None
    if isinstance(data, torch.Tensor):
        total = data.shape[0]
    else:
        try:
            total = len(data.dataset)  # type: ignore[union-attr]
        except (AttributeError, TypeError):
            total = None
    was_training = model.training
    model.eval()
    layouts: Optional[dict[str, Layout]] = None
    try:
        with torch.no_grad(), tqdm(total=total, desc="dataset examples", disable=not progress, leave=False) as bar:
            for batch in _batches(data, batch_size):
                x = preprocess_input(model, batch.to(device=device, dtype=torch.float32))
                if layouts is None:  # before the first pass: a wrong target fails before any work
                    layouts = get_layouts(model, layers, input_shape=tuple(x.shape[1:]))
                    for o in objs:
                        o.validate(layouts)
                acts = run_until(model, x, layers, detach=True)
                yield torch.stack([o(acts, layouts).float() for o in objs]).cpu()
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)


def objective_values(
    model: nn.Module,
    targets: Union[TargetLike, Sequence[TargetLike]],
    data: Data,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    progress: bool = False,
) -> torch.Tensor:
    """``[targets, images]`` values of each objective on each image (pixels in ``[0, 1]``)."""
    _, objs = _objectives(targets)
    return torch.cat(list(_scan(model, objs, data, batch_size, device, progress)), dim=1)


def dataset_examples(
    model: nn.Module,
    targets: Union[TargetLike, Sequence[TargetLike]],
    data: Data,
    k: int = 9,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> dict[str, DatasetExamples]:
    """Top-``k`` images of ``data`` for each target, streamed with a running top-k.

    Args:
        model: the model (``preprocess_input`` is applied to the images).
        targets: target strings / objectives (one or many).
        data: ``[N, C, H, W]`` tensor of ``[0, 1]`` images, or an iterable/DataLoader of such
            batches (or of ``(images, labels)`` tuples).
        k: examples per target (fewer if the data set is smaller).
        batch_size: images per forward pass when ``data`` is a tensor.

    Returns:
        ``{target: DatasetExamples}`` with indices and values, strongest first.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    names, objs = _objectives(targets)
    best_v = torch.empty(len(objs), 0)
    best_i = torch.empty(len(objs), 0, dtype=torch.long)
    offset = 0
    for vals in _scan(model, objs, data, batch_size, device, progress):
        idx = torch.arange(offset, offset + vals.shape[1]).expand(len(objs), -1)
        offset += vals.shape[1]
        cand_v = torch.cat([best_v, vals], dim=1)
        cand_i = torch.cat([best_i, idx], dim=1)
        top = torch.topk(cand_v, min(k, cand_v.shape[1]), dim=1)
        best_v, best_i = top.values, torch.gather(cand_i, 1, top.indices)
    if offset == 0:
        raise ValueError("the data set is empty")
    return {name: DatasetExamples(name, best_i[j].clone(), best_v[j].clone()) for j, name in enumerate(names)}
