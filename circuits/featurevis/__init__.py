"""Feature visualization: an image that maximally activates a neuron names it.

::

    from circuits.featurevis import RenderSettings, render, variable_names, objectives
    result = render(model, ["mixed4a:476", "mixed4a:477"], steps=512)    # batched
    result = render(model, ["mixed4a:476"], RenderSettings(steps=256, seed=1))
    result.images                  # [2, 3, 128, 128] in [0, 1]
    names = variable_names(model, [f"mixed4a:{i}" for i in range(200)])  # cached on disk
    render(model, objectives.channel("mixed4a", 1) + 0.5 * objectives.neuron("mixed4a", 2))

Modules: ``settings`` (:class:`RenderSettings`, every render setting in one object), ``param`` (Fourier image + colour decorrelation), ``transforms`` (Lucid's robustness
transforms as one affine resample), ``objectives``, ``relu`` (redirected ReLU), ``rendering``
(:func:`render`, :func:`variable_names`, :func:`cache_requests`),
``cache`` (disk cache by model hash + request), ``examples`` (dataset examples: whole images
by an objective, or receptive-field crops ranked by max activation with the most negative ones).
"""

from . import objectives
from .cache import FeatureVisCache, default_cache_dir
from .examples import (
    DatasetExamples,
    NeuronExamples,
    ReceptiveFields,
    dataset_examples,
    neuron_examples,
    objective_values,
    pre_activation,
    receptive_fields,
)
from .objectives import Objective, as_objective, channel, direction, direction_cossim, neuron
from .param import ImageParam
from .relu import RedirectedReLUFunction, redirected_relu
from .rendering import (
    RENDER_OPTIONS,
    RenderResult,
    RenderWarning,
    activation_floats_per_image,
    bf16_autocast_supported,
    cache_requests,
    element_seed,
    learning_rate,
    render,
    variable_names,
)
from .settings import RenderSettings, default_optimizer
from .transforms import Transforms, default_transforms

__all__ = [
    "render",
    "variable_names",
    "cache_requests",
    "RenderResult",
    "RenderSettings",
    "RENDER_OPTIONS",
    "default_optimizer",
    "RenderWarning",
    "activation_floats_per_image",
    "bf16_autocast_supported",
    "learning_rate",
    "element_seed",
    "objectives",
    "Objective",
    "as_objective",
    "channel",
    "neuron",
    "direction",
    "direction_cossim",
    "dataset_examples",
    "objective_values",
    "DatasetExamples",
    "neuron_examples",
    "NeuronExamples",
    "receptive_fields",
    "ReceptiveFields",
    "pre_activation",
    "FeatureVisCache",
    "default_cache_dir",
    "ImageParam",
    "Transforms",
    "default_transforms",
    "redirected_relu",
    "RedirectedReLUFunction",
]
