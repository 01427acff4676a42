"""The atlas's neuron pages: the stored task results joined into :func:`circuits.figures.pages.write_pages`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from .._io import PathLike
from ..datasets import DATASET_TITLES, load_dataset
from ..figures.pages import PageData, neuron_index, write_pages
from .plan import AtlasPlan, cache_requests
from .store import ResultStore
from .tasks import read_examples, read_tables

__all__ = ["build_atlas_pages"]


def _local_cache(plan: AtlasPlan, store: ResultStore, out: Path, progress: bool) -> Path:
    """A local folder with every rendered image: the store itself, or a mirror of a URL store."""
    if store.local_root is not None:
        return store.local_root
    from tqdm.auto import tqdm

    mirror = out / "cache-mirror"
    rels = [o for t in plan.tasks_of("render") for o in t.outputs]
    for rel in tqdm(rels, desc="fetching images", disable=not progress, leave=False):
        if not (mirror / rel).is_file():
            store.download(rel, mirror / rel)
    return mirror


def build_atlas_pages(plan: AtlasPlan, model: nn.Module, store: ResultStore, out_dir: PathLike,
                      progress: bool = True, title: Optional[str] = None) -> tuple[Path, int]:
    """Build the neuron pages of a finished plan into ``out_dir/pages``.

    The weights/NMF sections come from the ``tables`` tasks, the feature visualizations from
    the store and the dataset examples from the ``examples`` tasks. Neurons the plan did not
    render or scan (inputs shown on the pages when the plan was made with
    ``upstream_renders="none"``) are rendered and scanned here. Returns ``(index.html, images
    rendered while building)``.
    """
    from ..featurevis import FeatureVisCache, dataset_examples, render, variable_names

    out = Path(out_dir)
    device = plan.device
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # a driver without the cluster's GPUs: forward passes only
            device = "cpu"
    model = model.to(device).eval()
    cache = FeatureVisCache(_local_cache(plan, store, out, progress))
    sections = {(layer, c): secs for layer in plan.layers for c, secs in read_tables(store, plan, layer).items()}
    known, _ = neuron_index(plan.neurons, sections)
    targets = [f"{layer}:{c}" for layer, chs in known.items() for c in sorted(chs)]
    requests = cache_requests(model, targets, plan.render, plan.device.split(":")[0])
    unplanned = [t for t, r in zip(targets, requests) if r not in cache]
    if unplanned:
        render(model, unplanned, cache=cache, progress=progress, **plan.render)
    images = variable_names(model, targets, cache=cache, progress=False, **plan.render)
    data, examples, name = None, {}, ""
    if plan.dataset:
        data, name = load_dataset(plan.dataset, plan.dataset_size), DATASET_TITLES.get(plan.dataset, plan.dataset)
        for layer in plan.layers:
            examples.update(read_examples(store, plan, layer))
        rest = [t for t in targets if t not in examples]
        if rest:
            found = dataset_examples(model, rest, data, k=plan.n_examples, progress=progress)
            examples.update({t: (ex.indices.cpu().numpy(), ex.values.cpu().numpy()) for t, ex in found.items()})
    settings = plan.settings.replace(title=title or plan.settings.title or f"{plan.model_class} atlas")
    page = PageData.build(model, plan.neurons, plan.upstream, sections, settings, images=images,
                          examples=examples, example_images=data, dataset_name=name)
    return write_pages(page, out / "pages", progress=progress), len(unplanned)
