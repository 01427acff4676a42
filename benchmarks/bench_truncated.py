"""Forward pass truncated at ``mixed3b`` (``circuits.run_until``) vs the full InceptionV1 forward.

The "peer" here is the ordinary full forward pass (what Lucent does: it runs the whole model
and reads the layer from a hook)."""

from __future__ import annotations

import argparse

import torch

from circuits.layers import capture, run_until
from circuits.models import InceptionV1

from .common import report, timeit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--layer", default="mixed3b")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = InceptionV1().eval()
    x = torch.rand(args.batch, 3, 224, 224) * 255 - 117

    def full() -> torch.Tensor:
        with torch.no_grad(), capture(model, args.layer) as acts:
            model(x)
        return acts[args.layer]

    def truncated() -> torch.Tensor:
        with torch.no_grad():
            return run_until(model, x, args.layer)[args.layer]

    assert torch.equal(full(), truncated())
    return report(f"forward to {args.layer}, batch {args.batch}", "full forward + hook", timeit(full), timeit(truncated))


if __name__ == "__main__":
    main()
