"""The handlers of ``circuits`` subcommands: each turns parsed arguments into one library call.

A handler takes the parsed ``argparse.Namespace`` and returns the exit status; errors are
raised and mapped to exit codes in one place (:func:`circuits.cli.main`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._io import atomic_path, check_writable
from ..layers import parse_target
from ..models import check_device, input_shape, resolve_model
from .parser import UsageError, parse_channels

__all__ = ["HANDLERS", "load_model"]


# ----------------------------------------------------------------------------- shared


def load_model(args: argparse.Namespace) -> nn.Module:
    """The model of ``--model/--weights/--sha256/--device`` (:func:`circuits.models.resolve_model`),
    with torch's thread count set from ``--threads``."""
    check_device(args.device)
    model = resolve_model(args.model, args.weights, args.sha256, args.device)
    threads = _threads(args, model)
    if threads is not None:
        torch.set_num_threads(threads)
    return model


def _threads(args: argparse.Namespace, model: nn.Module) -> Any:
    """``--threads``, else 1 for small models on the CPU (tiny convolutions gain nothing from threads), else None."""
    threads = getattr(args, "threads", None)
    if threads is None and torch.device(args.device).type == "cpu" and max(input_shape(model)[1:]) <= 64:
        threads = 1
    return threads


def _layers_only(values: Any, what: str) -> None:
    """Refuse a target (``layer:channel@y,x``) where a command takes whole layers: never drop its parts."""
    for v in [values] if isinstance(values, str) else list(values or []):
        t = parse_target(v)
        if t.channel is not None or t.position is not None:
            raise UsageError(
                f"{what} takes layer names, not neurons: {v!r} names {t.layer}:{t.channel}"
                + (f" at {t.position}" if t.position is not None else "")
                + " (use the command's channel options, e.g. --channels or --neurons)"
            )


def _split_targets(spec: str) -> list[str]:
    """``"mixed3b:1,mixed3b:2@3,4"`` → ``["mixed3b:1", "mixed3b:2@3,4"]`` (a position's comma stays)."""
    out: list[str] = []
    for part in spec.split(","):
        if out and "@" in out[-1] and "," not in out[-1].split("@", 1)[1] and part.strip().isdigit():
            out[-1] += "," + part
        elif part.strip():
            out.append(part.strip())
    return out


def _progress(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--quiet``, and only where a person watches (stderr is a terminal),
    so that logs and captured errors stay one line each."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def _render(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"steps": args.steps, "seed": args.seed, "progress": _progress(args)}
    if getattr(args, "size", None):
        kw["size"] = args.size
    return kw


def _cache(args: argparse.Namespace) -> Any:
    if getattr(args, "no_cache", False):
        return None
    return args.cache if getattr(args, "cache", None) else True


def _file_or_folder(args: argparse.Namespace, default_folder: str, name: str) -> Path:
    """``--out`` as a file (when it ends in .png/.svg/.pdf) or a folder (created) holding ``name``."""
    if args.out and Path(args.out).suffix.lower() in (".png", ".svg", ".pdf"):
        out = Path(args.out)
        check_writable(out.parent)
        return out
    return check_writable(args.out or default_folder) / name


# ----------------------------------------------------------------------------- commands


def cmd_layers(args: argparse.Namespace) -> int:
    from ..layers import list_layers

    model = load_model(args)
    rows = list_layers(model, input_shape(model), leaves_only=args.leaves)
    if args.filter:
        rows = [r for r in rows if args.filter in r.name]
    width = max([len(r.name) for r in rows] + [5])
    print(f"{'layer':<{width}}  {'type':<22} {'output shape':<16} {'params':>10}")
    for r in rows:
        shape = "×".join(map(str, r.output_shape)) if r.output_shape else "-"
        print(f"{r.name:<{width}}  {r.type:<22} {shape:<16} {r.n_params:>10,}")
    total = sum(p.numel() for p in model.parameters())
    print(f"{len(rows)} layers, {total:,} parameters")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from ..featurevis import render
    from ..figures.raster import save_image_png
    from ..layers import check_channel, get_layer
    from ..wiring import channel_counts

    model = load_model(args)
    targets = [parse_target(t) for t in args.targets]
    counts = channel_counts(model)
    for t in targets:
        if t.channel is None:
            raise UsageError(f"{str(t)!r} is a layer; a neuron is 'layer:channel', e.g. mixed3b:12")
        get_layer(model, t.layer)
        if t.layer not in counts:
            raise UsageError(f"layer {t.layer!r} has no channels to pick from")
        check_channel(t.layer, t.channel, counts[t.layer])
    out = check_writable(args.out)
    names = [str(t) for t in targets]
    result = render(model, names, cache=_cache(args), **_render(args))
    for i, name in enumerate(names):
        path = out / (re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png")
        save_image_png(result.images[i].numpy(), path, scale=args.scale)
        print(f"{path}  objective {float(result.objective_values[i]):.4g}")
    return 0


def cmd_figure(args: argparse.Namespace) -> int:
    from ..figures.neuron import neuron_figure

    from ..wiring import default_upstream

    if args.from_layer:
        _layers_only(args.from_layer, "--from")
    model = load_model(args)
    t = parse_target(args.target)
    up = args.from_layer or default_upstream(model, t.layer)[0]
    res = neuron_figure(
        model, args.type, args.target, up, top=args.top, neurons=parse_channels(args.neurons),
        inputs=parse_channels(args.inputs), k=args.k, render=_render(args), cache=_cache(args),
    )
    out = _file_or_folder(args, "figures", f"{args.type}_{t.layer}_{t.channel}_from_{up}.{args.format}")
    res.save(out)
    print(out)
    return 0


def cmd_nmf(args: argparse.Namespace) -> int:
    from ..figures.neuron import nmf_figures
    from ..layers import get_layer
    from ..wiring import channel_counts, default_upstream

    _layers_only([args.layer, args.from_layer] if args.from_layer else [args.layer], "nmf")
    model = load_model(args)
    get_layer(model, args.layer)
    chans = parse_channels(args.channels, channel_counts(model).get(args.layer))
    out = check_writable(args.out)
    up = args.from_layer or default_upstream(model, args.layer)[0]
    files = []
    for (kh, kw), fig, explained in nmf_figures(model, args.layer, up, chans, args.k):
        for c, e in explained.items():
            print(f"{args.layer}:{c}  {kh}×{kw}  explained {e:.3f}")
        path = out / f"nmf_{args.layer}_from_{up}_{kh}x{kw}.{args.format}"
        files.append(fig.save(path))
    for p in files:
        print(p)
    return 0


def cmd_expand(args: argparse.Namespace) -> int:
    from ..expanded import connection_weights, top_inputs
    from ..layers import get_layer

    _layers_only([args.from_layer, args.to_layer], "expand")
    model = load_model(args)
    get_layer(model, args.from_layer)
    get_layer(model, args.to_layer)
    chans = parse_channels(args.channels)
    name = f"expanded_{args.from_layer}_to_{args.to_layer}.npz"
    out = Path(args.out) if args.out else Path(name)
    if out.suffix != ".npz":
        out = check_writable(out) / name
    else:
        check_writable(out.parent)
    conn = connection_weights(model, args.from_layer, args.to_layer, channels=chans)
    W = conn.weights.detach().cpu()
    ch_list = chans if chans is not None else list(range(W.shape[0]))
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, weights=W.numpy(), channels=np.asarray(ch_list), kind=np.asarray(conn.kind),
                     from_layer=np.asarray(args.from_layer), to_layer=np.asarray(args.to_layer))
    print(f"{conn.kind} weights {args.from_layer} → {args.to_layer}: shape {tuple(W.shape)} [out, in, kh, kw] → {out}")
    top = top_inputs(W, args.top)
    show = ch_list[: args.show]
    for j, c in enumerate(show):
        items = ", ".join(f"{args.from_layer}:{int(i)} ({float(v):.3g})" for i, v in zip(top.indices[j], top.norms[j]))
        print(f"  {args.to_layer}:{c} ← {items}")
    if len(ch_list) > len(show):
        print(f"  ... {len(ch_list) - len(show)} more output channels in the file (--show N prints more)")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    from ..figures.pages import PageSettings, build_pages, default_neurons
    from ..wiring import interesting_layers

    _layers_only(args.layers, "--layers")
    _layers_only(args.upstream, "--upstream")
    model = load_model(args)
    layers = args.layers
    neurons: Any = args.per_layer
    if args.neurons:
        neurons = [t for spec in args.neurons for t in _split_targets(spec)]
    elif neurons is None:
        neurons = default_neurons(model, layers or interesting_layers(model))
    upstream = None
    if args.upstream:
        upstream = {layer: args.upstream for layer in (layers or interesting_layers(model))}
    out = check_writable(args.out)
    settings = PageSettings(top_k=args.top_k, factor_threshold=args.factor_threshold, dataset_size=args.dataset_size,
                            n_examples=args.examples, n_outgoing=args.outgoing,
                            dataset=None if args.no_dataset else "auto", render={k: v for k, v in _render(args).items() if k != "progress"})
    index = build_pages(model, layers, out, settings, neurons=neurons, upstream=upstream, cache=_cache(args),
                        progress=_progress(args))
    print(f"Neuron pages written. Open {index.resolve().as_uri()}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..inspect.report import inspect_report
    from ..inspect.stats import StatsConfig
    from ..models import WEIGHT_SUFFIXES

    source = args.source or args.model
    if args.source and args.model != "fashion-inception":
        raise UsageError("give the model or checkpoint once: as SOURCE or with --model")
    check_device(args.device)
    path = Path(source).expanduser()
    is_file = path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES or "/" in source
    if is_file and args.weights is None:
        target: Any = source  # a checkpoint: streamed, no model code needed
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
    else:
        target = resolve_model(source, args.weights, args.sha256, args.device)
    if args.out is not None:
        check_writable(args.out)
    cfg = StatsConfig(zero_threshold=args.zero_threshold, spectral=args.spectral)
    inspect_report(target, out_dir=args.out, format=args.format, plots=not args.no_plots, config=cfg,
                   embedding=not args.no_embedding, device=args.device, progress=_progress(args))
    return 0


def cmd_atlas(args: argparse.Namespace) -> int:
    from ..atlas import build_atlas

    if args.engine == "ray" and args.max_tasks is not None:
        raise UsageError("--max-tasks is for the local engine")
    _layers_only(args.layers, "--layers")
    if args.engine == "local":
        check_device(args.device)
    model = resolve_model(args.model, args.weights, args.sha256, "cpu")
    # the local engine runs here: the small-model default applies; on Ray a task runs one thread unless --threads
    threads = _threads(args, model) if args.engine == "local" else args.threads
    render = {"size": args.size} if args.size else {}
    result = build_atlas(
        model, args.layers, args.out, engine=args.engine, cache=args.store, dry_run=args.dry_run,
        pages=not args.no_pages, progress=_progress(args), max_tasks=args.max_tasks, threads=threads,
        wait=args.wait, address=args.address,
        num_cpus=args.num_cpus, max_retries=args.max_retries, neurons=args.per_layer, steps=args.steps,
        seed=args.seed, batch_size=args.batch_size, device=args.device, top_k=args.top_k,
        upstream_renders="none" if args.no_upstream_renders else "all",
        dataset=None if args.no_dataset else "auto", dataset_size=args.dataset_size, n_examples=args.examples,
        **render,
    )
    for note in result.notes:
        print(f"note: {note}")
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


def cmd_diff(args: argparse.Namespace) -> int:
    from ..inspect.diff import diff_report

    from ..models import WEIGHT_SUFFIXES

    def side(spec: str) -> Any:
        path = Path(spec).expanduser()
        if path.exists() or path.suffix.lower() in WEIGHT_SUFFIXES or "/" in spec:
            return path  # a checkpoint, streamed
        return resolve_model(spec)  # a model name

    if args.out is not None:
        check_writable(args.out)
    diff_report(side(args.a), side(args.b), out_dir=args.out, format=args.format, top_k=args.top, progress=_progress(args))
    return 0


HANDLERS = {
    "diff": cmd_diff,
    "layers": cmd_layers,
    "render": cmd_render,
    "figure": cmd_figure,
    "nmf": cmd_nmf,
    "expand": cmd_expand,
    "explore": cmd_explore,
    "inspect": cmd_inspect,
    "atlas": cmd_atlas,
}
