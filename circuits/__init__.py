"""circuits: circuits-style interpretability for PyTorch models — look at the weights.

The public API is re-exported here; each idea lives in its own module:

* :mod:`circuits.models` — InceptionV1 (Lucid names), the bundled trained FashionInception,
  torchvision and timm models, weight loading, :func:`resolve_model`;
* :mod:`circuits.layers` — layer names (``name#k`` per call), capture, replacement, truncated forward passes;
* :mod:`circuits.layouts` — where channels and positions are in any activation (CNN, channels-last, ViT tokens, dense);
* :mod:`circuits.wiring` — how layers connect: channel counts, branches, adjacent
  convolutions, the blocks worth paging;
* :mod:`circuits.nmf` — one-sided NMF of weights (batched, scikit-learn style);
* :mod:`circuits.expanded` — linearisation and expanded weights;
* :mod:`circuits.featurevis` — feature visualization ("variable names"), cached;
* :mod:`circuits.figures` — small multiples, grids, heatmaps, neuron pages;
* :mod:`circuits.inspect` — statistics, plots, tracking, reports;
* :mod:`circuits.atlas` — every neuron's page, locally or on Ray.

Names are imported on first use (``import circuits`` itself loads no torch), so the command
line starts quickly; ``circuits.X`` is always the real object with its real signature.

Example:
    >>> import circuits
    >>> model = circuits.load_model()                    # trained FashionInception
    >>> E = circuits.expanded_weights(model, "mixed3a", "mixed3b")
    >>> tuple(E.shape)
    (160, 112, 5, 5)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → the module it lives in
_EXPORTS: dict[str, str] = {
    # models
    "InceptionV1": "models", "FashionInception": "models", "load_model": "models", "resolve_model": "models",
    "load_weights": "models", "preprocess_input": "models", "WeightsError": "models",
    # layers
    "LayerInfo": "layers", "Target": "layers", "UnknownLayerError": "layers", "capture": "layers",
    "get_layer": "layers", "layer_names": "layers", "list_layers": "layers", "parse_target": "layers",
    "replace_activation": "layers", "run_until": "layers", "centre": "layers", "AmbiguousLayerError": "layers",
    # layouts
    "Layout": "layouts", "get_layout": "layouts", "set_layout": "layouts",
    # wiring
    "channel_counts": "wiring", "interesting_layers": "wiring", "default_upstream": "wiring",
    # nmf
    "posneg": "nmf", "NMFReducer": "nmf", "neuron_factors": "nmf", "family_factors": "nmf",
    "factors_rgb": "nmf", "weight_banding": "nmf",
    # expanded
    "linearized": "expanded", "expanded_weights": "expanded", "neuron_weights": "expanded",
    "connection_weights": "expanded", "top_inputs": "expanded", "per_example_connections": "expanded",
    "Connection": "expanded", "TopInputs": "expanded", "UnsupportedNonlinearityError": "expanded",
    # featurevis
    "render": "featurevis", "variable_names": "featurevis", "RenderResult": "featurevis",
    "dataset_examples": "featurevis", "FeatureVisCache": "featurevis",
    # figures
    "build_pages": "figures", "PageSettings": "figures", "NeuronCard": "figures", "neuron_card": "figures",
}
_SUBMODULES = ("expanded", "featurevis", "figures", "layers", "layouts", "models", "nmf", "wiring", "inspect", "atlas")

__all__ = list(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from . import atlas, expanded, featurevis, figures, inspect, layers, layouts, models, nmf, wiring
    from .expanded import (
        Connection,
        TopInputs,
        UnsupportedNonlinearityError,
        connection_weights,
        expanded_weights,
        linearized,
        neuron_weights,
        per_example_connections,
        top_inputs,
    )
    from .featurevis import FeatureVisCache, RenderResult, dataset_examples, render, variable_names
    from .figures import NeuronCard, PageSettings, build_pages, neuron_card
    from .layers import (
        AmbiguousLayerError,
        LayerInfo,
        Target,
        UnknownLayerError,
        capture,
        centre,
        get_layer,
        layer_names,
        list_layers,
        parse_target,
        replace_activation,
        run_until,
    )
    from .layouts import Layout, get_layout, set_layout
    from .models import FashionInception, InceptionV1, WeightsError, load_model, load_weights, preprocess_input, resolve_model
    from .nmf import NMFReducer, factors_rgb, family_factors, neuron_factors, posneg, weight_banding
    from .wiring import channel_counts, default_upstream, interesting_layers
