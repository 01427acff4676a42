"""One centre everywhere: ``circuits.layers.centre(h, w) = (h // 2, w // 2)`` is the position that
"the neuron" means in feature-visualization objectives, dataset examples, per-example
connections, expanded weights and activation layouts, on odd and even map sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from circuits.expanded import expanded_weights, per_example_connections
from circuits.featurevis import dataset_examples, objectives
from circuits.layers import centre, run_until
from circuits.layouts import get_layout


class Tiny(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 2, 3, padding=1)
        self.input_shape = (1, size, size)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("size", [7, 8, 13, 14])
def test_every_module_means_the_same_centre(size):
    torch.manual_seed(size)
    model = Tiny(size).eval()
    x = torch.rand(5, 1, size, size)
    cy, cx = centre(size, size)
    assert (cy, cx) == (size // 2, size // 2)
    acts = run_until(model, x, ["b"])
    # feature-visualization objective and activation layout
    assert torch.equal(objectives.neuron("b", 1)(acts), acts["b"][:, 1, cy, cx])
    assert get_layout(model, "b").centre() == (cy, cx)
    # dataset examples of a neuron rank by its activation at the centre
    ex = dataset_examples(model, [objectives.neuron("b", 1)], x, k=5, progress=False)
    key = next(iter(ex))
    torch.testing.assert_close(ex[key].values, acts["b"][:, 1, cy, cx].sort(descending=True).values)
    # per-example connections: no position = the centre
    plain = per_example_connections(model, x, "a", "b:1")
    at = per_example_connections(model, x, "a", f"b:1@{cy},{cx}")
    torch.testing.assert_close(plain, at)
    # expanded weights (a linear path): the same gradient as at the centre
    E = expanded_weights(model, "a", "b", channels=[1])[0]
    torch.testing.assert_close(E, at[0], rtol=1e-5, atol=1e-6)
