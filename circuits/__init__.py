"""circuits: circuits-style interpretability for PyTorch models — look at the weights.

The public API is re-exported here; each idea lives in its own module
(``layers``, ``models``, ``nmf``, ``expanded``, ``featurevis``, ``figures``, ``inspect``).
"""

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
from .models import InceptionV1, FashionInception, load_model, load_weights, preprocess_input

__version__ = "0.1.0"

__all__ = [
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
    "InceptionV1",
    "FashionInception",
    "load_model",
    "load_weights",
    "preprocess_input",
]
