"""Dataset examples: the second kind of variable name — the inputs that activate a target most.

:func:`dataset_examples` streams a data set through the model once (stopping after the deepest
layer any target reads), keeps a running top-k per target, and returns the indices and
activation values of the ``k`` strongest images for every target. :func:`objective_values`
returns the full ``[targets, images]`` matrix when all values are wanted.

:func:`neuron_examples` is what a neuron page shows: for each neuron the images with the
largest *maximum over positions* of its channel, cropped to the neuron's receptive field at
that position (measured with the linearised model, :func:`receptive_fields`), and the images
that drive its pre-activation most negative (:func:`pre_activation`).

Activations are read through each layer's :class:`~circuits.layouts.Layout` (detected once
per model and image size, :func:`circuits.layouts.get_layouts`): a channel is the feature
axis and a position one on the spatial or patch grid, for CNNs, channels-last stages and
ViT blocks alike (the class and register tokens are not positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import centre, run_until
from ..layouts import Layout, get_layouts
from ..models import device_and_dtype, preprocess_input
from ..models import input_shape as model_input_shape
from .objectives import Objective, as_objective

__all__ = [
    "DatasetExamples",
    "dataset_examples",
    "objective_values",
    "NeuronExamples",
    "neuron_examples",
    "ReceptiveFields",
    "receptive_fields",
    "crop_boxes",
    "pre_activation",
]

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


# ----------------------------------------------------------------------------- receptive-field crops

_CLIPPING_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def pre_activation(model: nn.Module, layer: str, channel: int) -> Optional[tuple[str, int]]:
    """The pre-activation of a neuron that a ReLU clips: ``(layer', channel')`` or ``None``.

    A concatenating layer (an Inception block) is followed into the branch that holds
    ``channel``; a ``ReLU``/``ReLU6`` module is followed to the named module whose output it
    takes, e.g. ``mixed3b:60`` → ``("mixed3b_3x3_pre_relu_conv", 12)``. ``None`` when the
    neuron is not the output of such an activation module (then its own values, which may be
    negative, are what "most negative" ranks).
    """
    from ..wiring import concat_branches, layer_graph

    graph = layer_graph(model)
    modules = dict(model.named_modules())
    for _ in range(8):  # a concat of concats is followed a few levels deep at most
        branches = concat_branches(model, layer, graph)
        if not branches:
            break
        hit = next(((b, first) for b, first, n in branches if first <= channel < first + n), None)
        if hit is None:
            return None
        layer, channel = hit[0], channel - hit[1]
    if not isinstance(modules.get(layer), _CLIPPING_ACTIVATIONS):
        return None
    call = graph.call(layer)
    if call is None or len(call.inputs) != 1:
        return None
    source = graph.producer(call.inputs[0], exclude=[layer])
    shape = graph.output_shape(layer)
    if source is None or graph.output_shape(source) != shape or not shape or not 0 <= channel < shape[0]:
        return None
    return source, channel


@dataclass
class ReceptiveFields:
    """Where the neurons of one layer see the input, measured on the linearised model.

    Attributes:
        layer: the layer.
        boxes: ``[n, 4]`` int64 ``(y0, y1, x0, x1)`` (ends exclusive) in input pixels: the
            bounding box of the input gradient's support for each ``(channel, position)``.
        exact: ``False`` when the model could not be linearised (then each box is the
            whole image).
    """

    layer: str
    boxes: np.ndarray
    exact: bool = True


def _gradient_boxes(model: nn.Module, layer: str, channels: Sequence[int], positions: Sequence[tuple[int, int]],
                    batch_size: int) -> np.ndarray:
    """``[n, 4]`` support boxes of the linearised input gradient of each ``(channel, position)``
    (raises :class:`circuits.expanded.UnsupportedNonlinearityError` for a model it cannot linearise)."""
    from ..expanded import linearized

    c, h, w = model_input_shape(model)
    n = len(channels)
    device, dtype = device_and_dtype(model)
    layout = get_layouts(model, [layer], input_shape=(c, h, w))[layer]
    boxes = np.zeros((n, 4), dtype=np.int64)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        m = stop - start
        ch = [int(v) for v in channels[start:stop]]
        ys = [int(p[0]) for p in positions[start:stop]]
        xs = [int(p[1]) for p in positions[start:stop]]
        x = torch.zeros((m, c, h, w), device=device, dtype=dtype, requires_grad=True)
        # inside the block every torch call is linearised (reductions such as max refuse)
        with torch.enable_grad(), linearized(model):
            act = layout.canonical(run_until(model, preprocess_input(model, x), [layer])[layer])
            shape = tuple(act.shape[1:])
            if max(ch) >= shape[0] or min(ch) < 0 or max(ys) >= shape[1] or max(xs) >= shape[2] or min(ys + xs) < 0:
                raise ValueError(f"a channel or position is outside {layer!r}'s activation {shape}")
            picked = act[torch.arange(m), torch.tensor(ch), torch.tensor(ys), torch.tensor(xs)]
            (grad,) = torch.autograd.grad(picked.sum(), x)
        support = grad.detach().abs().amax(1) > 0  # [m, h, w]
        rows, cols = support.any(2).cpu(), support.any(1).cpu()
        for j in range(m):
            ry, rx = rows[j].nonzero().flatten(), cols[j].nonzero().flatten()
            if len(ry) == 0:  # the neuron does not depend on the input at all (a dead path)
                boxes[start + j] = (0, h, 0, w)
            else:
                boxes[start + j] = (int(ry[0]), int(ry[-1]) + 1, int(rx[0]), int(rx[-1]) + 1)
    return boxes


def receptive_fields(
    model: nn.Module,
    layer: str,
    channels: Sequence[int],
    positions: Sequence[tuple[int, int]],
    batch_size: int = 256,
    measure_all: bool = False,
) -> ReceptiveFields:
    """The input box that each neuron ``layer:channels[i]`` at ``positions[i]`` depends on.

    Measured exactly: the gradient of the neuron w.r.t. the input image, with the model
    linearised (:func:`circuits.expanded.linearized`: ReLU → identity, max pool → average
    pool), is non-zero exactly on the pixels some path reaches — the neuron's receptive field,
    clipped by the image border. The linearised gradient does not depend on the input, so one
    batched backward pass on zeros answers many queries.

    A convolutional network is translation-equivariant up to the border, so by default each
    channel is measured once, at the centre, and moved by the layer's stride (input size /
    grid size) to the other positions, clipped to the image; a sample of the other positions
    (the four corners included) is measured as well, and if any of them disagrees, every
    position is measured (``measure_all=True`` always measures every query). A model that
    cannot be linearised (GELU, layer norm, ...) gives the whole image with ``exact=False``.

    Args:
        model: the model (eval mode).
        layer: the layer.
        channels: ``n`` channels.
        positions: ``n`` ``(y, x)`` on the layer's grid (``(0, 0)`` for dense layers).

    Example:
        >>> rf = receptive_fields(model, "mixed3a", [0, 40], [(7, 7), (0, 0)])  # doctest: +SKIP
        >>> rf.boxes            # the 1x1 branch at the centre, the 3x3 branch at a corner   # doctest: +SKIP
        array([[11, 19, 11, 19],
               [ 0,  7,  0,  7]])
    """
    from ..expanded import UnsupportedNonlinearityError

    if len(channels) != len(positions):
        raise ValueError(f"one position per channel: got {len(channels)} channels and {len(positions)} positions")
    c, h, w = model_input_shape(model)
    n = len(channels)
    full = np.tile(np.array([[0, h, 0, w]], dtype=np.int64), (n, 1))
    if n == 0:
        return ReceptiveFields(layer, full.reshape(0, 4))
    was_training = model.training
    model.eval()
    try:
        if measure_all:
            return ReceptiveFields(layer, _gradient_boxes(model, layer, channels, positions, batch_size))
        grid = get_layouts(model, [layer], input_shape=(c, h, w))[layer].grid or (1, 1)
        chans = sorted({int(v) for v in channels})
        cy, cx = centre(*grid)
        at_centre = dict(zip(chans, _gradient_boxes(model, layer, chans, [(cy, cx)] * len(chans), batch_size)))
        sy, sx = h / grid[0], w / grid[1]
        if sy != int(sy) or sx != int(sx):
            return ReceptiveFields(layer, _gradient_boxes(model, layer, channels, positions, batch_size))

        def predict(ch: int, y: int, x: int) -> np.ndarray:
            b = at_centre[ch]
            dy, dx = int(sy) * (y - cy), int(sx) * (x - cx)
            return np.array([max(0, b[0] + dy), min(h, b[1] + dy), max(0, b[2] + dx), min(w, b[3] + dx)])

        boxes = np.stack([predict(int(ch), int(p[0]), int(p[1])) for ch, p in zip(channels, positions)])
        gh, gw = grid
        corners = [(0, 0), (0, gw - 1), (gh - 1, 0), (gh - 1, gw - 1)]
        rng = np.random.default_rng(0)
        sample = [(chans[int(rng.integers(len(chans)))], corner) for corner in corners]
        sample += [(int(channels[i]), (int(positions[i][0]), int(positions[i][1])))
                   for i in rng.choice(n, size=min(n, 16), replace=False)]
        measured = _gradient_boxes(model, layer, [s[0] for s in sample], [s[1] for s in sample], batch_size)
        if any((predict(ch, *pos) != box).any() for (ch, pos), box in zip(sample, measured)):
            boxes = _gradient_boxes(model, layer, channels, positions, batch_size)
        return ReceptiveFields(layer, boxes)
    except UnsupportedNonlinearityError:
        return ReceptiveFields(layer, full, exact=False)
    finally:
        model.train(was_training)


def crop_boxes(boxes: np.ndarray, size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Crops of one ``size`` (clipped to the image) that contain each box, as ``[n, 4]``
    ``(y0, y1, x0, x1)``: the box itself where it is that size, else shifted inwards from the
    border the receptive field was clipped by."""
    (ch, cw), (h, w) = size, image_size
    ch, cw = min(ch, h), min(cw, w)
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    if ((boxes[:, 1] - boxes[:, 0]) > ch).any() or ((boxes[:, 3] - boxes[:, 2]) > cw).any():
        raise ValueError(f"a box is larger than the crop size {size}")
    y0 = np.where(boxes[:, 0] == 0, 0, np.minimum(boxes[:, 0], h - ch))
    x0 = np.where(boxes[:, 2] == 0, 0, np.minimum(boxes[:, 2], w - cw))
    return np.stack([y0, y0 + ch, x0, x0 + cw], axis=1)


@dataclass
class NeuronExamples:
    """Dataset examples of one neuron as receptive-field crops, strongest first.

    The top examples are the images with the largest *maximum over positions* of the
    neuron's channel, each cropped around the position of that maximum; the negative
    examples those with the most negative minimum of its pre-activation
    (:func:`pre_activation`; the neuron's own values when it has none).

    Attributes:
        target: ``"layer:channel"``.
        indices, values, positions, crops: top examples: image indices ``[k]``, max
            activations ``[k]``, their ``(y, x)`` on the layer's grid ``[k, 2]`` and the
            crop ``(y0, y1, x0, x1)`` in input pixels ``[k, 4]`` (one size for all crops of
            the neuron, containing the receptive field of the neuron at that position).
        negative_target: what the negative examples rank (``"mixed3b_3x3_pre_relu_conv:12"``).
        neg_indices, neg_values, neg_positions, neg_crops: the most negative examples, most
            negative first.
        rf_size: the neuron's receptive field ``(h, w)`` in input pixels (clipped to the image).
        rf_exact: whether the receptive field was measured (``False``: whole images).
    """

    target: str
    indices: np.ndarray
    values: np.ndarray
    positions: np.ndarray
    crops: np.ndarray
    negative_target: str
    neg_indices: np.ndarray
    neg_values: np.ndarray
    neg_positions: np.ndarray
    neg_crops: np.ndarray
    rf_size: tuple[int, int]
    rf_exact: bool = True

    def crop_images(self, images: torch.Tensor, negative: bool = False) -> list[torch.Tensor]:
        """The crops ``[C, h, w]`` out of the data set ``images [N, C, H, W]``."""
        idx, boxes = (self.neg_indices, self.neg_crops) if negative else (self.indices, self.crops)
        return [images[int(i), :, b[0]:b[1], b[2]:b[3]] for i, b in zip(idx, boxes)]


def _running_topk(best: Optional[tuple[torch.Tensor, ...]], vals: torch.Tensor, idx: torch.Tensor,
                  pos: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, ...]:
    """Merge ``[n, B]`` candidates into the running ``[n, k]`` best values/indices/positions."""
    if best is not None:
        vals, idx, pos = torch.cat([best[0], vals], 1), torch.cat([best[1], idx], 1), torch.cat([best[2], pos], 1)
    top = torch.topk(vals, min(k, vals.shape[1]), dim=1, largest=largest)
    return top.values, torch.gather(idx, 1, top.indices), torch.gather(pos, 1, top.indices)


def neuron_examples(
    model: nn.Module,
    neurons: Union[Mapping[str, Sequence[int]], Sequence[str]],
    data: Data,
    k: int = 8,
    negative: bool = True,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> dict[str, NeuronExamples]:
    """Top-``k`` (and most negative) dataset examples of many neurons, as receptive-field crops.

    One pass over ``data`` (stopping after the deepest layer needed) keeps, for every
    neuron, a running top-``k`` of the images by the maximum of its channel over all
    positions (with the position), and a running bottom-``k`` by the minimum of its
    pre-activation (:func:`pre_activation`). Then :func:`receptive_fields` measures the
    receptive field of each neuron at each chosen position, and every example is cropped
    to one size per neuron that contains it (:func:`crop_boxes`).

    Args:
        model: the model (``preprocess_input`` is applied to the images).
        neurons: ``{layer: [channels]}`` or ``["layer:channel", ...]``.
        data: ``[N, C, H, W]`` tensor of ``[0, 1]`` images, or an iterable of such batches.
        k: examples per neuron and kind (fewer if the data set is smaller).
        negative: also find the most negative examples.

    Returns:
        ``{"layer:channel": NeuronExamples}``.

    Raises:
        ValueError: a non-finite activation (the model produced NaN or Inf on the data).

    Example:
        >>> ex = neuron_examples(model, {"mixed3b": [60]}, images, k=8)["mixed3b:60"]  # doctest: +SKIP
        >>> ex.crop_images(images)[0].shape                                            # doctest: +SKIP
        torch.Size([1, 20, 20])
    """
    from ..layers import check_channel, parse_target

    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    wanted: dict[str, list[int]] = {}
    if isinstance(neurons, Mapping):
        for layer, chs in neurons.items():
            wanted.setdefault(layer, []).extend(int(c) for c in chs)
    else:
        for spec in ([neurons] if isinstance(neurons, str) else neurons):
            t = parse_target(spec)
            if t.channel is None or t.position is not None:
                raise ValueError(f"neuron {spec!r} must be 'layer:channel' (examples search all positions)")
            wanted.setdefault(t.layer, []).append(t.channel)
    wanted = {layer: list(dict.fromkeys(chs)) for layer, chs in wanted.items() if chs}
    if not wanted:
        raise ValueError("at least one neuron is needed")
    # the signal of each neuron's negative examples: its pre-activation, else itself
    neg_of: dict[tuple[str, int], tuple[str, int]] = {}
    for layer, chs in wanted.items():
        for c in chs:
            neg_of[(layer, c)] = (pre_activation(model, layer, c) or (layer, c)) if negative else (layer, c)
    neg_wanted: dict[str, list[int]] = {}
    for src, sc in neg_of.values():
        neg_wanted.setdefault(src, [])
        if sc not in neg_wanted[src]:
            neg_wanted[src].append(sc)
    layers = list(dict.fromkeys(list(wanted) + (list(neg_wanted) if negative else [])))
    if device is None:
        device, _ = device_and_dtype(model)
    top: dict[str, Optional[tuple[torch.Tensor, ...]]] = {layer: None for layer in wanted}
    bottom: dict[str, Optional[tuple[torch.Tensor, ...]]] = {layer: None for layer in neg_wanted} if negative else {}
    grids: dict[str, tuple[int, int]] = {}
    image_hw: Optional[tuple[int, int]] = None
    offset = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=data.shape[0] if isinstance(data, torch.Tensor) else None,
                                   desc="dataset examples", disable=not progress, leave=False) as bar:
            layouts: Optional[dict[str, Layout]] = None
            for batch in _batches(data, batch_size):
                x = preprocess_input(model, batch.to(device=device, dtype=torch.float32))
                if layouts is None:
                    layouts = get_layouts(model, layers, input_shape=tuple(x.shape[1:]))
                    image_hw = (int(batch.shape[-2]), int(batch.shape[-1]))
                    for layer in layers:
                        n = layouts[layer].channels
                        for c in wanted.get(layer, []) + neg_wanted.get(layer, []):
                            check_channel(layer, c, n)
                acts = run_until(model, x, layers, detach=True)
                b = batch.shape[0]
                for layer in layers:
                    a = layouts[layer].canonical(acts[layer]).float()
                    grids[layer] = (int(a.shape[2]), int(a.shape[3]))
                    for store, chs, largest in ((top, wanted.get(layer), True), (bottom, neg_wanted.get(layer), False)):
                        if layer not in store or not chs:
                            continue
                        flat = a[:, chs].flatten(2)  # [B, n, P]
                        if not torch.isfinite(flat).all():
                            raise ValueError(f"non-finite activations of {layer!r} on images {offset}..{offset + b - 1}")
                        v, p = flat.max(2) if largest else flat.min(2)
                        idx = torch.arange(offset, offset + b).expand(len(chs), -1)
                        store[layer] = _running_topk(store[layer], v.T.cpu(), idx, p.T.cpu(), k, largest)
                offset += b
                bar.update(b)
    finally:
        model.train(was_training)
    if offset == 0 or image_hw is None:
        raise ValueError("the data set is empty")

    # receptive fields of every (neuron, position) used, plus each neuron's centre (its full size)
    queries: dict[str, dict[tuple[int, tuple[int, int]], int]] = {}

    def query(layer: str, c: int, flat_pos: int) -> int:
        gw = grids[layer][1]
        asked = queries.setdefault(layer, {})
        return asked.setdefault((c, (flat_pos // gw, flat_pos % gw)), len(asked))

    plan: dict[tuple[str, int], tuple] = {}
    for layer, chs in wanted.items():
        tv, ti, tp = top[layer]  # type: ignore[misc]
        for j, c in enumerate(chs):
            centre_q = query(layer, c, _centre_flat(grids[layer]))
            pos_q = [query(layer, c, int(p)) for p in tp[j]]
            src, sc = neg_of[(layer, c)]
            neg = None
            if negative:
                nv, ni, npos = bottom[src]  # type: ignore[misc]
                jj = neg_wanted[src].index(sc)
                # a pre-activation sees what its ReLU output sees (same grid): ask the neuron itself
                rf_layer, rf_c = (layer, c) if grids[src] == grids[layer] else (src, sc)
                neg = (src, sc, nv[jj], ni[jj], npos[jj], [query(rf_layer, rf_c, int(p)) for p in npos[jj]],
                       query(rf_layer, rf_c, _centre_flat(grids[rf_layer])), rf_layer)
            plan[(layer, c)] = (tv[j], ti[j], tp[j], pos_q, centre_q, neg)
    rfs = {layer: receptive_fields(model, layer, [q[0] for q in qs], [q[1] for q in qs]) for layer, qs in queries.items()}  # qs: insertion order = index

    def size_of(boxes: np.ndarray) -> tuple[int, int]:
        return int((boxes[:, 1] - boxes[:, 0]).max()), int((boxes[:, 3] - boxes[:, 2]).max())

    result: dict[str, NeuronExamples] = {}
    for (layer, c), (tv, ti, tp, pos_q, centre_q, neg) in plan.items():
        rf = rfs[layer]
        own = rf.boxes[pos_q + [centre_q]]
        boxes = [own]
        exact = rf.exact
        if neg is not None:
            src, sc, nv, ni, npos, neg_q, neg_centre, rf_layer = neg
            boxes.append(rfs[rf_layer].boxes[neg_q + [neg_centre]])
            exact = exact and rfs[rf_layer].exact
        size = size_of(np.concatenate(boxes))
        gw, ngw = grids[layer][1], grids[neg[0]][1] if neg is not None else 1
        empty = np.zeros((0,), dtype=np.int64)
        result[f"{layer}:{c}"] = NeuronExamples(
            target=f"{layer}:{c}",
            indices=ti.numpy().astype(np.int64),
            values=tv.numpy().astype(np.float32),
            positions=np.stack([tp.numpy() // gw, tp.numpy() % gw], 1).astype(np.int64),
            crops=crop_boxes(rf.boxes[pos_q], size, image_hw),
            negative_target=f"{neg[0]}:{neg[1]}" if neg is not None else "",
            neg_indices=ni.numpy().astype(np.int64) if neg is not None else empty,
            neg_values=nv.numpy().astype(np.float32) if neg is not None else empty.astype(np.float32),
            neg_positions=(np.stack([npos.numpy() // ngw, npos.numpy() % ngw], 1).astype(np.int64)
                           if neg is not None else empty.reshape(0, 2)),
            neg_crops=crop_boxes(rfs[neg[7]].boxes[neg[5]], size, image_hw) if neg is not None else empty.reshape(0, 4),
            rf_size=size,
            rf_exact=exact,
        )
    return result


def _centre_flat(grid: tuple[int, int]) -> int:
    y, x = centre(*grid)
    return y * grid[1] + x
