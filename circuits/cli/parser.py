"""The ``circuits`` argument parser: every subcommand and its options, nothing else.

Imports only ``argparse`` (no torch), so ``circuits --help`` starts fast. Every command that
works on a model takes the same model and output options (:func:`model_options`); the
handlers live in :mod:`circuits.cli.commands`.
"""

from __future__ import annotations

import argparse
import re
from typing import Optional

__all__ = ["build_parser", "COMMANDS", "UsageError", "parse_channels", "positive_int", "non_negative_int", "fraction"]

PROG = "circuits"


class UsageError(ValueError):
    """Bad input from the command line (exit status 2)."""


# ----------------------------------------------------------------------------- argument types


def _int(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
    return v


def positive_int(text: str) -> int:
    """``type=`` for an integer ``>= 1``."""
    return _int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """``type=`` for an integer ``>= 0``."""
    return _int(text, 0, "an integer >= 0")


def seconds(text: str) -> float:
    """``type=`` for a finite number of seconds ``>= 0``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0.0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of seconds >= 0, got {text}")
    return v


def fraction(text: str) -> float:
    """``type=`` for a number in ``[0, 1]``."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def parse_channels(spec: Optional[str], n: Optional[int] = None) -> Optional[list[int]]:
    """``"0-3,7,9"`` → ``[0, 1, 2, 3, 7, 9]``; ``None`` → ``None`` (all)."""
    if spec is None:
        return None
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(f"bad channel list {spec!r}: use numbers and ranges like 0-3,7")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise UsageError(f"bad channel range {part!r}: the end is before the start")
        out.extend(range(a, b + 1))
    if not out:
        raise UsageError(f"empty channel list {spec!r}")
    if n is not None:
        bad = [c for c in out if c >= n]
        if bad:
            raise UsageError(f"channel {bad[0]} is out of range: the layer has {n} channels (0..{n - 1})")
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- option groups

COMMANDS: dict[str, str] = {
    "explore": "build the neuron pages for the model's most interesting layers (the main job)",
    "figure": "one figure for a neuron (small multiples, factors, family grid, spatial positions, NMF, heatmap)",
    "render": "feature visualizations to PNG",
    "nmf": "NMF pictures (3 spatial factors as RGB) of a layer's neurons",
    "expand": "expanded weights between two layers: .npz and top inputs",
    "layers": "list layers with output shapes and parameter counts",
    "inspect": "per-layer weight statistics and plots of a model or a checkpoint (no model code needed)",
    "atlas": "every neuron's page for whole layers: plan, render (locally or on Ray), build pages; resumable",
    "diff": "per-tensor change between two checkpoints (or models): relative change, cosine, changed units, NaN-aware",
    "run": "run a YAML config (command: plus arguments), e.g. configs/explore_fashion.yaml",
}
FIGURE_TYPES = ("small-multiples", "factors", "family", "spatial", "nmf", "heatmap")
INSPECT_FORMATS = ("table", "csv", "json", "html")


def model_options(p: argparse.ArgumentParser, out_help: str, out_default: Optional[str] = None) -> None:
    """The options every model command takes: which model, where, and where results go."""
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="fashion-inception",
                   help="model name (fashion-inception, inceptionv1, a torchvision name, timm:NAME) or a weights "
                        "file whose architecture is recognised (default: %(default)s)")
    g.add_argument("--weights", default=None, help="weights file or https:// URL for --model NAME")
    g.add_argument("--sha256", default=None, help="expected sha256 of the weights (required for URLs)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    g.add_argument("--out", default=out_default, help=out_help)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: 1 for small models such as fashion-inception, whose "
                        "tiny convolutions gain nothing from threads and slow down a lot on a busy CPU; else torch's default)")


def render_options(p: argparse.ArgumentParser, steps: int) -> None:
    """Feature-visualization options (steps, size, seed, cache)."""
    g = p.add_argument_group("feature visualization")
    g.add_argument("--steps", type=non_negative_int, default=steps, help="optimisation steps per image (default: %(default)s)")
    g.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's, at most 128)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--cache", default=None, help="feature-visualization cache folder (default: ~/.cache/circuits/featurevis)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the cache")


def _explore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help=COMMANDS["explore"], description=COMMANDS["explore"])
    p.add_argument("--layers", nargs="+", default=None, help="layers to page (default: mixed3a mixed3b mixed4a, or evenly spread blocks)")
    p.add_argument("--per-layer", type=positive_int, default=None,
                   help="neurons per layer, evenly spread over the branches (default: every neuron when the paged layers "
                        "have at most 1000 channels in total, as in the bundled model; else 16 per layer)")
    p.add_argument("--neurons", nargs="+", default=None, help="exact neurons instead, e.g. mixed3b:60 mixed4a:12")
    p.add_argument("--upstream", nargs="+", default=None, help="upstream layers for every paged layer (default: previous block + bottlenecks)")
    p.add_argument("--top-k", type=positive_int, default=50, help="incoming connections shown per upstream layer (default: %(default)s)")
    p.add_argument("--outgoing", type=positive_int, default=16, help="outgoing connections shown per downstream layer (default: %(default)s)")
    p.add_argument("--factor-threshold", type=fraction, default=0.8,
                   help="group by NMF factor when 3 factors explain at least this much (default: %(default)s)")
    p.add_argument("--dataset-size", type=positive_int, default=2000, help="Fashion-MNIST test images scanned for dataset examples (default: %(default)s)")
    p.add_argument("--examples", type=positive_int, default=8, help="dataset examples per neuron, top and most negative each (default: %(default)s)")
    p.add_argument("--no-dataset", action="store_true", help="no dataset examples")
    render_options(p, steps=256)
    model_options(p, "folder for the site (default: ./circuits-pages)", "circuits-pages")


def _figure(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figure", help=COMMANDS["figure"], description=COMMANDS["figure"])
    p.add_argument("type", choices=FIGURE_TYPES, help="figure type")
    p.add_argument("target", help="the neuron, layer:channel, e.g. mixed3b:60")
    p.add_argument("--from", dest="from_layer", default=None, help="upstream layer (default: the previous block)")
    p.add_argument("--top", type=positive_int, default=12, help="input neurons shown (default: %(default)s)")
    p.add_argument("--neurons", default=None, help="family: output channels, e.g. 60-63")
    p.add_argument("--inputs", default=None, help="family: input channels (default: the --top strongest)")
    p.add_argument("--k", type=positive_int, default=3, help="NMF factors (default: %(default)s)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="when --out is a folder (default: %(default)s)")
    render_options(p, steps=128)
    model_options(p, "output file (.png/.svg/.pdf) or folder (default: ./figures)")


def _render(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("render", help=COMMANDS["render"], description=COMMANDS["render"])
    p.add_argument("targets", nargs="+", help="neurons, e.g. mixed3b:60 mixed4a:12 (layer:channel@y,x for a position)")
    p.add_argument("--scale", type=positive_int, default=4, help="PNG upscaling factor (default: %(default)s)")
    render_options(p, steps=256)
    model_options(p, "folder for the PNGs (default: ./renders)", "renders")


def _nmf(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nmf", help=COMMANDS["nmf"], description=COMMANDS["nmf"])
    p.add_argument("layer", help="layer whose neurons are factored, e.g. mixed3b")
    p.add_argument("--from", dest="from_layer", default=None, help="upstream layer (default: the previous block)")
    p.add_argument("--channels", default=None, help="channels, e.g. 0-15,40 (default: the first 16 with spatial weights)")
    p.add_argument("--k", type=positive_int, default=3, help="factors (default: %(default)s)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png")
    model_options(p, "folder for the figure (default: ./nmf)", "nmf")


def _expand(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("expand", help=COMMANDS["expand"], description=COMMANDS["expand"])
    p.add_argument("from_layer", help="upstream layer, e.g. mixed3a")
    p.add_argument("to_layer", help="downstream layer, e.g. mixed3b")
    p.add_argument("--channels", default=None, help="output channels, e.g. 0-7 (default: all)")
    p.add_argument("--top", type=positive_int, default=10, help="top inputs printed per output channel (default: %(default)s)")
    p.add_argument("--show", type=positive_int, default=8, help="output channels printed (default: %(default)s)")
    model_options(p, "the .npz file or a folder (default: ./expanded_FROM_to_TO.npz)")


def _layers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help=COMMANDS["layers"], description=COMMANDS["layers"])
    p.add_argument("--leaves", action="store_true", help="only modules without children")
    p.add_argument("--filter", default=None, help="only layers whose name contains this")
    model_options(p, "(unused)")


def _inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help=COMMANDS["inspect"], description=COMMANDS["inspect"])
    p.add_argument("source", nargs="?", default=None,
                   help="a model name or a checkpoint (.pth/.safetensors/sharded folder); the same as --model")
    p.add_argument("--format", default="table", choices=INSPECT_FORMATS, help="what to print (html writes OUT/report.html)")
    p.add_argument("--zero-threshold", type=float, default=1e-6, help="|w| at or below this counts as zero")
    p.add_argument("--spectral", default="auto", choices=["auto", "exact", "power", "none"], help="spectral norm method")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--no-embedding", action="store_true", help="skip the t-SNE plot")
    model_options(p, "folder for stats.csv/json, PNG plots and report.html")


def _atlas(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("atlas", help=COMMANDS["atlas"], description=COMMANDS["atlas"],
                       epilog="Exit status: 0 done (or dry run), 3 stopped early (--max-tasks; run again to "
                              "continue), 2 bad input, 1 a task failed (finished work is kept).")
    g = p.add_argument_group("what to build")
    g.add_argument("--layers", nargs="+", default=None, help="layers whose every channel gets a page (default: as explore)")
    g.add_argument("--per-layer", type=positive_int, default=None, help="only this many neurons per layer (default: all)")
    g.add_argument("--batch-size", type=positive_int, default=None, help="images per render task (default: from the device's memory)")
    g.add_argument("--top-k", type=positive_int, default=50, help="connections per upstream layer on each page (default: %(default)s)")
    g.add_argument("--no-upstream-renders", action="store_true",
                   help="render only the chosen layers' neurons (the pages render the inputs they show)")
    g.add_argument("--no-dataset", action="store_true", help="no dataset examples")
    g.add_argument("--dataset-size", type=positive_int, default=2000, help="dataset images scanned (default: %(default)s)")
    g.add_argument("--examples", type=positive_int, default=8, help="dataset examples per neuron (default: %(default)s)")
    g.add_argument("--no-pages", action="store_true", help="compute and cache everything, but build no pages")
    g = p.add_argument_group("running")
    g.add_argument("--cache", dest="store", default=None,
                   help="result store: a folder or an fsspec URL shared by all workers (default: OUT/cache)")
    g.add_argument("--engine", choices=("local", "ray"), default="local", help="local (one process) or ray (default: %(default)s)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan and its estimated run time (from a short real run of each part); render nothing")
    g.add_argument("--max-tasks", type=non_negative_int, default=None, help="local engine: stop after this many tasks")
    g.add_argument("--wait", type=seconds, nargs="?", const=True, default=False, metavar="SECONDS",
                   help="when another run is using --out or --cache: wait for it (at most SECONDS if given) "
                        "instead of stopping with exit status 2")
    g.add_argument("--address", default=None, help="ray: an existing cluster (auto, ray://host:10001); default: start a local one")
    g.add_argument("--num-cpus", type=positive_int, default=None, help="ray: CPU slots of a local cluster started here")
    g.add_argument("--max-retries", type=non_negative_int, default=3, help="ray: retries of a failed task (default: %(default)s)")
    g = p.add_argument_group("feature visualization")
    g.add_argument("--steps", type=non_negative_int, default=512, help="optimisation steps per image (default: %(default)s)")
    g.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's, at most 128)")
    g.add_argument("--seed", type=int, default=0, help="base seed; each neuron's render is seeded from it (default: %(default)s)")
    model_options(p, "output folder: plan.json, pages/, atlas.json (default: ./circuits-atlas)", "circuits-atlas")


def _diff(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help=COMMANDS["diff"], description=COMMANDS["diff"])
    p.add_argument("a", help="the first checkpoint (file or sharded folder) or model name")
    p.add_argument("b", help="the second one")
    p.add_argument("--format", default="table", choices=INSPECT_FORMATS[:1] + ("json", "html"),
                   help="what to print (html writes OUT/diff.html) (default: %(default)s)")
    p.add_argument("--top", type=positive_int, default=5, help="changed units listed per tensor (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="folder for diff.txt, diff.json and diff.html")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help=COMMANDS["run"], description=COMMANDS["run"])
    p.add_argument("config", help="YAML file with a 'command:' key and that command's arguments "
                                  "(or an 'experiment:' key: runs experiments/<name>.py)")
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="override config values, e.g. steps=16 out=/tmp/x")
    for opt, what in (("weights", "weights file or https:// URL, e.g. inception5h.pth"), ("sha256", "expected sha256 of the weights"),
                      ("device", "torch device"), ("out", "output folder")):
        p.add_argument(f"--{opt}", default=None, help=f"shortcut for --set {opt}=...: {what}")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for ``circuits`` (no heavy imports)."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Circuits-style interpretability for PyTorch models: look at the weights.",
        epilog="Start with `circuits explore`, then open the index.html it prints. Exit status: 0 success, "
               "2 bad input (one line on stderr), 1 an internal error (--debug shows the traceback).",
    )
    parser.add_argument("--version", action="version", version=f"circuits {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_explore, _figure, _render, _nmf, _expand, _layers, _inspect, _diff, _atlas, _run):
        add(sub)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{command: its parser}``."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}
