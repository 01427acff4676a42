"""circuits: circuits-style interpretability for PyTorch models — look at the weights.

The public API is re-exported here; each idea lives in its own module:

* :mod:`circuits.models` — InceptionV1 (Lucid names), the bundled trained FashionInception,
  torchvision models, weight loading;
* :mod:`circuits.layers` — layer names, capture, replacement, truncated forward passes;
* :mod:`circuits.nmf` — one-sided NMF of weights (batched, scikit-learn style);
* :mod:`circuits.expanded` — linearisation and expanded weights;
* :mod:`circuits.featurevis` — feature visualization ("variable names"), cached;
* :mod:`circuits.figures` — small multiples, grids, heatmaps, neuron pages;
* :mod:`circuits.inspect` — statistics, plots, tracking, reports;
* :mod:`circuits.atlas` — every neuron's page, locally or on Ray.

Example:
    >>> import circuits
    >>> model = circuits.load_model()                    # trained FashionInception
    >>> E = circuits.expanded_weights(model, "mixed3a", "mixed3b")
    >>> tuple(E.shape)
    (160, 112, 5, 5)
"""

from . import expanded, featurevis, figures, layers, models, nmf
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
from .figures import build_pages
from .layers import (
    LayerInfo,
    Target,
    UnknownLayerError,
    capture,
    get_layer,
    layer_names,
    list_layers,
    parse_target,
    replace_activation,
    run_until,
)
from .models import FashionInception, InceptionV1, WeightsError, load_model, load_weights, preprocess_input
from .nmf import NMFReducer, family_factors, factors_rgb, neuron_factors, posneg, weight_banding

__version__ = "0.1.0"

__all__ = [
    # models
    "InceptionV1",
    "FashionInception",
    "load_model",
    "load_weights",
    "preprocess_input",
    "WeightsError",
    # layers
    "LayerInfo",
    "Target",
    "UnknownLayerError",
    "capture",
    "get_layer",
    "layer_names",
    "list_layers",
    "parse_target",
    "replace_activation",
    "run_until",
    # nmf
    "posneg",
    "NMFReducer",
    "neuron_factors",
    "family_factors",
    "factors_rgb",
    "weight_banding",
    # expanded
    "linearized",
    "expanded_weights",
    "neuron_weights",
    "connection_weights",
    "top_inputs",
    "per_example_connections",
    "Connection",
    "TopInputs",
    "UnsupportedNonlinearityError",
    # featurevis
    "render",
    "variable_names",
    "RenderResult",
    "dataset_examples",
    "FeatureVisCache",
    # figures
    "build_pages",
    # submodules
    "expanded",
    "featurevis",
    "figures",
    "layers",
    "models",
    "nmf",
]
