"""``circuits atlas``: the whole-model atlas from the command line.

::

    circuits atlas --model fashion-inception --out atlas/                 # local engine
    circuits atlas --model fashion-inception --out atlas/ --dry-run       # tasks + estimated device time
    circuits atlas --model inceptionv1 --weights inception5h.pth --layers mixed3a mixed3b \\
        --engine ray --address auto --cache s3://bucket/atlas --device cuda --out atlas/

The CLI wires :func:`add_atlas_subcommand` into its subparsers and calls
:func:`run_atlas_command`. Exit status: 0 done (or dry run), 3 stopped early (``--max-tasks``;
run again to continue), 2 bad input, 1 a task failed (finished work is kept).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from .._cli_types import non_negative_int, positive_int

__all__ = ["add_atlas_subcommand", "run_atlas_command", "main"]

HELP = "every neuron's page for whole layers: plan, render (locally or on Ray), build pages; resumable"


def _add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="fashion-inception",
                   help="model name (fashion-inception, inceptionv1, a torchvision name) or a weights file (default: %(default)s)")
    g.add_argument("--weights", default=None, help="weights file or https:// URL for --model NAME")
    g.add_argument("--sha256", default=None, help="expected sha256 of the weights (required for URLs)")
    g.add_argument("--device", default="cpu", help="device the renders run on: cpu or cuda (default: %(default)s)")
    g.add_argument("--out", default="circuits-atlas", help="output folder: plan.json, pages/, atlas.json (default: %(default)s)")
    g.add_argument("--cache", default=None,
                   help="result store: a folder or an fsspec URL shared by all workers (default: OUT/cache)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    g = p.add_argument_group("what to build")
    g.add_argument("--layers", nargs="+", default=None, help="layers whose every channel gets a page (default: mixed3a mixed3b mixed4a)")
    g.add_argument("--per-layer", type=positive_int, default=None, help="only this many neurons per layer (default: all)")
    g.add_argument("--steps", type=non_negative_int, default=512, help="feature-visualization steps (default: %(default)s)")
    g.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's, at most 128)")
    g.add_argument("--seed", type=int, default=0, help="base seed; each neuron's render is seeded from it (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per render task (default: from the device's memory)")
    g.add_argument("--top-k", type=positive_int, default=50, help="connections per upstream layer on each page (default: %(default)s)")
    g.add_argument("--no-upstream-renders", action="store_true",
                   help="render only the chosen layers' neurons (the pages render the inputs they show)")
    g.add_argument("--no-dataset", action="store_true", help="no dataset examples")
    g.add_argument("--dataset-size", type=positive_int, default=2000, help="dataset images scanned (default: %(default)s)")
    g.add_argument("--examples", type=positive_int, default=8, help="dataset examples per neuron (default: %(default)s)")
    g.add_argument("--no-pages", action="store_true", help="compute and cache everything, but build no pages")

    g = p.add_argument_group("running")
    g.add_argument("--engine", choices=("local", "ray"), default="local", help="local (one process) or ray (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the estimated device time; render nothing")
    g.add_argument("--max-tasks", type=non_negative_int, default=None, help="local engine: stop after this many tasks")
    g.add_argument("--address", default=None, help="ray: an existing cluster (auto, ray://host:10001); default: start a local one")
    g.add_argument("--num-cpus", type=positive_int, default=None, help="ray: CPU slots of a local cluster started here")
    g.add_argument("--max-retries", type=non_negative_int, default=3, help="ray: retries of a failed task (default: %(default)s)")


def add_atlas_subcommand(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``atlas`` to a CLI's subparsers; sets ``func=run_atlas_command`` (and returns the parser)."""
    p = subparsers.add_parser("atlas", help=HELP, description=HELP)
    _add_arguments(p)
    p.set_defaults(func=run_atlas_command)
    return p


def _load_model(args: argparse.Namespace) -> Any:
    from ..cli import load_model_arg

    return load_model_arg(args.model, args.weights, args.sha256, "cpu")


def run_atlas_command(args: argparse.Namespace) -> int:
    """Run ``circuits atlas`` with parsed ``args``; returns the exit status."""
    from ..layers import UnknownLayerError
    from ..models import WeightsError
    from .local import AtlasTaskError
    from .run import build_atlas

    progress = not getattr(args, "quiet", False)
    try:
        if args.device.startswith("cuda") and args.engine == "local":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"--device {args.device}: no CUDA device on this machine")
        if args.engine == "ray" and args.max_tasks is not None:
            raise ValueError("--max-tasks is for the local engine")
        model = _load_model(args)
        render = {"size": args.size} if args.size else {}
        result = build_atlas(
            model, args.layers, args.out, engine=args.engine, cache=args.cache, dry_run=args.dry_run,
            pages=not args.no_pages, progress=progress, max_tasks=args.max_tasks, address=args.address,
            num_cpus=args.num_cpus, max_retries=args.max_retries, neurons=args.per_layer, steps=args.steps,
            seed=args.seed, render=render, batch_size=args.batch_size, device=args.device, top_k=args.top_k,
            upstream_renders="none" if args.no_upstream_renders else "all",
            dataset=False if args.no_dataset else "auto", dataset_size=args.dataset_size, n_examples=args.examples,
        )
    except (UnknownLayerError, WeightsError, FileNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, ValueError, TypeError, ImportError) as exc:
        if getattr(args, "debug", False):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"circuits atlas: error: {msg}", file=sys.stderr)
        return 2
    except AtlasTaskError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"circuits atlas: error: {exc} (finished tasks are kept; run again to continue)", file=sys.stderr)
        return 1
    print(result.plan.summary(result.store))
    if result.estimate is not None:
        print(result.estimate)
        return 0
    print(result.report)
    if result.index is not None:
        print(f"Atlas pages: {result.index.resolve().as_uri()}")
        return 0
    if not result.report.completed:  # type: ignore[union-attr]
        print("Stopped early; run the same command again to continue.")
        return 3
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m circuits.atlas.cli ...`` (the same as ``circuits atlas ...``)."""
    parser = argparse.ArgumentParser(prog="circuits atlas", description=HELP)
    _add_arguments(parser)
    return run_atlas_command(parser.parse_args(list(argv) if argv is not None else None))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
