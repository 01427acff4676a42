"""The ``circuits`` command line: a thin layer over the library.

::

    circuits explore                      # neuron pages for the default model; prints where to open them
    circuits layers                       # layers with output shapes and parameter counts
    circuits render mixed3b:12 mixed3b:40 --steps 128 --out renders/
    circuits figure small-multiples mixed3b:60 --from mixed3a --top 12 --out fig.png
    circuits nmf mixed3b --from mixed3a --channels 0-15
    circuits expand mixed3a mixed3b --channels 60 --top 10 --out e.npz
    circuits inspect fashion-inception
    circuits atlas --out atlas/          # every neuron's page for whole layers (resumable, Ray)
    circuits run configs/explore_fashion.yaml

Common options: ``--model`` (a name, or a weights file whose architecture is recognised),
``--weights``, ``--sha256``, ``--device``, ``--out``, ``--quiet``. Exit status: 0 success,
2 bad input or usage (one line on stderr, no traceback), 1 a failure while running
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ._cli_types import positive_int

__all__ = ["main", "build_parser", "load_model_arg", "parse_channels"]

PROG = "circuits"
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
FIGURE_TYPES = ("small-multiples", "factors", "family", "spatial", "nmf", "heatmap")


class UsageError(ValueError):
    """Bad input from the command line (exit status 2)."""


# ----------------------------------------------------------------------------- helpers


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


def _looks_like_file(model: str) -> bool:
    return Path(model).suffix.lower() in _WEIGHT_SUFFIXES or "/" in model or "\\" in model or Path(model).exists()


def load_model_arg(model: str, weights: Optional[str] = None, sha256: Optional[str] = None, device: str = "cpu") -> Any:
    """Load ``--model`` (a name, or a weights file whose architecture is recognised) with ``--weights``."""
    import torch

    from .models import FashionInception, InceptionV1, WeightsError, load_model
    from .models.loading import check_state_dict, load_state_dict_file

    if not _looks_like_file(model):
        return load_model(model, weights=weights, sha256=sha256, device=device)
    if weights is not None:
        raise UsageError(f"--model {model} is a file; give the architecture's name with --model and the file with --weights")
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    state = load_state_dict_file(path, sha256)
    for name, cls in (("fashion-inception", FashionInception), ("inceptionv1", InceptionV1)):
        try:
            check_state_dict(cls(), state, str(path))
        except WeightsError:
            continue
        return load_model(name, weights=path, sha256=sha256, device=device)
    raise WeightsError(
        f"{path} fits neither fashion-inception nor inceptionv1; for another architecture pass "
        f"--model NAME --weights {path} (NAME: a torchvision model such as resnet18)"
    )


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False)


def _out(args: argparse.Namespace, default: str) -> Path:
    from .figures.pages import check_writable

    return check_writable(args.out or default)


def _neuron(spec: str) -> tuple[str, int]:
    from .layers import parse_target

    t = parse_target(spec)
    if t.channel is None:
        raise UsageError(f"{spec!r} is a layer; a neuron is 'layer:channel', e.g. mixed3b:12")
    return t.layer, t.channel


def _check_neuron(model: Any, layer: str, channel: int) -> int:
    from .figures.pages import _channel_counts
    from .layers import check_channel, get_layer

    get_layer(model, layer)
    counts = _channel_counts(model)
    if layer not in counts:
        raise UsageError(f"layer {layer!r} has no channels to pick from")
    check_channel(layer, channel, counts[layer])
    return counts[layer]


def _render_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"steps": args.steps, "seed": args.seed, "progress": _progress(args)}
    if getattr(args, "size", None):
        kw["size"] = args.size
    return kw


def _cache(args: argparse.Namespace) -> Any:
    if getattr(args, "no_cache", False):
        return None
    return args.cache if getattr(args, "cache", None) else True


def _upstream_of(model: Any, layer: str, given: Optional[str]) -> str:
    if given:
        return given
    from .figures.pages import default_upstream

    return default_upstream(model, layer)[0]


# ----------------------------------------------------------------------------- commands


def cmd_layers(args: argparse.Namespace, model: Any) -> int:
    from .layers import list_layers
    from .models import input_shape

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


def cmd_render(args: argparse.Namespace, model: Any) -> int:
    from .featurevis import render
    from .figures.raster import save_image_png
    from .layers import parse_target

    targets = [str(parse_target(t)) for t in args.targets]
    for t in targets:
        layer, ch = _neuron(t)
        _check_neuron(model, layer, ch)
    out = _out(args, "renders")
    kw = _render_kwargs(args)
    result = render(model, targets, cache=_cache(args), **kw)
    for i, t in enumerate(targets):
        path = out / (re.sub(r"[^A-Za-z0-9_.-]", "_", t) + ".png")
        save_image_png(result.images[i].numpy(), path, scale=args.scale)
        print(f"{path}  objective {float(result.objective_values[i]):.4g}")
    return 0


def _variable_images(model: Any, layer: str, channels: Sequence[int], args: argparse.Namespace) -> dict[int, Any]:
    from .featurevis import variable_names

    names = variable_names(model, [f"{layer}:{c}" for c in channels], cache=_cache(args), **_render_kwargs(args))
    return {c: names[f"{layer}:{c}"] for c in channels}


def _direction_images(model: Any, layer: str, vectors: Any, args: argparse.Namespace) -> list[Any]:
    import torch

    from .featurevis import objectives, render

    objs = [objectives.direction(layer, torch.as_tensor(v, dtype=torch.float32)) for v in vectors]
    res = render(model, objs, cache=_cache(args), **_render_kwargs(args))
    return [res.images[i].numpy() for i in range(len(objs))]


def cmd_figure(args: argparse.Namespace, model: Any) -> int:
    import numpy as np

    from . import figures
    from .figures.pages import connections_to

    layer, ch = _neuron(args.target)
    _check_neuron(model, layer, ch)
    up = _upstream_of(model, layer, args.from_layer)
    kind = args.type
    suffix = "." + args.format
    out = Path(args.out) if args.out and Path(args.out).suffix.lower() in (".png", ".svg", ".pdf") else None
    if out is None:
        folder = _out(args, "figures")
        out = folder / f"{kind}_{layer}_{ch}_from_{up}{suffix}"
    else:
        from .figures.pages import check_writable

        check_writable(out.parent)
    title = f"{up} → {layer}:{ch}"
    if kind == "family":
        outs = parse_channels(args.neurons) or [ch]
        if ch not in outs:
            outs = [ch] + outs
        found = connections_to(model, up, layer, outs)
        missing = [c for c in outs if c not in found]
        if missing:
            raise UsageError(f"{up} has no weights to {layer}:{missing[0]} (another branch?); choose --from or --neurons")
        shapes = {found[c][0].shape for c in outs}
        if len(shapes) > 1:
            raise UsageError(f"the neurons {outs} have differently sized kernels from {up} (different branches); pick one branch")
        W = np.stack([found[c][0] for c in outs])  # [n_out, in, kh, kw]
        ins = parse_channels(args.inputs)
        if ins is None:
            total = np.sqrt((W**2).sum(axis=(0, 2, 3)))
            ins = [int(i) for i in np.argsort(-total, kind="stable")[: args.top]]
        in_imgs = _variable_images(model, up, ins, args)
        out_imgs = _variable_images(model, layer, outs, args)
        res = figures.family_grid(
            W, [in_imgs[i] for i in ins], [out_imgs[c] for c in outs], inputs=ins, outputs=list(range(len(outs))),
            in_labels=[f"{up}:{i}" for i in ins], out_labels=[f"{layer}:{c}" for c in outs], title=f"{up} → {layer}",
        )
    else:
        found = connections_to(model, up, layer, [ch])
        if ch not in found:
            raise UsageError(f"{up} has no weights to {layer}:{ch} (it feeds another branch); choose another --from")
        w, wkind = found[ch]
        title += f" ({wkind})"
        if kind == "heatmap":
            order = figures.rank_inputs(w, args.top)[0]
            res = figures.weight_heatmap(w[order], titles=[f"{up}:{i}" for i in order])
        elif kind == "small-multiples":
            order = figures.rank_inputs(w, args.top)[0]
            imgs = _variable_images(model, up, [int(i) for i in order], args)
            all_imgs = [imgs.get(i) for i in range(w.shape[0])]
            res = figures.small_multiples(w, all_imgs, top_n=args.top, labels=[f"{up}:{i}" for i in range(w.shape[0])], title=title)
        elif kind == "spatial":
            dirs, _ = figures.spatial_directions(w)
            res = figures.spatial_position_grid(w, _direction_images(model, up, dirs, args), title=title)
        else:  # factors / nmf
            from .nmf import factors_rgb, neuron_factors

            if w.shape[1] * w.shape[2] < args.k:
                raise UsageError(f"the {w.shape[1]}×{w.shape[2]} kernel from {up} has fewer positions than {args.k} factors")
            f = neuron_factors(w[None], args.k)
            loadings = np.asarray(f.loadings[0].detach().cpu())
            spatial = np.asarray(f.spatial[0].detach().cpu())
            explained = float(f.explained[0])
            if kind == "factors":
                order, _ = figures.factor_order(w, loadings, args.top, spatial)
                imgs = _variable_images(model, up, [int(i) for i in order], args)
                res = figures.factor_ordered_multiples(
                    w, loadings, [imgs.get(i) for i in range(w.shape[0])], top_n=args.top, spatial_maps=spatial,
                    labels=[f"{up}:{i}" for i in range(w.shape[0])], title=f"{title}, NMF explains {explained:.0%}",
                )
            else:
                rgb = factors_rgb(f, scale=1)[0]
                fimgs = _direction_images(model, up, loadings[: min(3, args.k)], args)
                res = figures.nmf_rgb_figure(rgb, factor_images=fimgs if len(fimgs) == 3 else None,
                                             title=f"{title}: NMF explains {explained:.0%}")
    res.save(out)
    print(out)
    return 0


def cmd_nmf(args: argparse.Namespace, model: Any) -> int:
    import numpy as np

    from . import figures
    from .figures.pages import _channel_counts, connections_to
    from .layers import get_layer
    from .nmf import factors_rgb, neuron_factors

    get_layer(model, args.layer)
    counts = _channel_counts(model)
    n = counts.get(args.layer)
    if n is None:
        raise UsageError(f"layer {args.layer!r} has no channels")
    chans = parse_channels(args.channels, n) or list(range(min(n, 16)))
    up = _upstream_of(model, args.layer, args.from_layer)
    out_dir = _out(args, "nmf")
    found = connections_to(model, up, args.layer, chans)
    if not found:
        raise UsageError(f"{up} has no weights to any of the chosen channels of {args.layer}")
    by_shape: dict[tuple, list[int]] = {}
    for c, (w, _) in found.items():
        by_shape.setdefault(w.shape, []).append(c)
    rgbs, labels = {}, {}
    for shape, chs in by_shape.items():
        if shape[1] * shape[2] < args.k:
            print(f"skipping {len(chs)} neuron(s) with {shape[1]}×{shape[2]} kernels: fewer positions than {args.k} factors")
            continue
        f = neuron_factors(np.stack([found[c][0] for c in chs]), args.k)
        pics = factors_rgb(f, scale=max(1, 24 // max(shape[1:])))
        for j, c in enumerate(chs):
            rgbs[c] = pics[j]
            labels[c] = f"{args.layer}:{c} {float(f.explained[j]):.0%}"
            print(f"{args.layer}:{c}  from {up}  {shape[1]}×{shape[2]}  explained {float(f.explained[j]):.3f}")
    if not rgbs:
        raise UsageError("nothing to factor: every chosen neuron has a 1×1 (or too small) kernel from " + up)
    files = []
    for shape, chs in by_shape.items():
        chs = [c for c in chs if c in rgbs]
        if not chs:
            continue
        res = figures.nmf_rgb_figure(np.stack([rgbs[c] for c in chs]), labels=[labels[c] for c in chs],
                                     title=f"NMF of {up} → {args.layer} weights")
        path = out_dir / f"nmf_{args.layer}_from_{up}_{shape[1]}x{shape[2]}.{args.format}"
        files.append(res.save(path))
    for p in files:
        print(p)
    return 0


def cmd_expand(args: argparse.Namespace, model: Any) -> int:
    import numpy as np

    from .expanded import connection_weights, top_inputs
    from .layers import get_layer
    from .figures.pages import check_writable

    get_layer(model, args.from_layer)
    get_layer(model, args.to_layer)
    chans = parse_channels(args.channels)
    out = Path(args.out) if args.out else Path(f"expanded_{args.from_layer}_to_{args.to_layer}.npz")
    if out.suffix != ".npz":
        out = out / f"expanded_{args.from_layer}_to_{args.to_layer}.npz"
    check_writable(out.parent)
    conn = connection_weights(model, args.from_layer, args.to_layer, channels=chans)
    W = conn.weights.detach().cpu()
    ch_list = chans if chans is not None else list(range(W.shape[0]))
    from ._io import atomic_path

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


def cmd_explore(args: argparse.Namespace, model: Any) -> int:
    from .figures.pages import build_pages, interesting_layers

    layers = args.layers or interesting_layers(model)
    neurons: Any = args.per_layer
    if args.neurons:
        neurons = [t for spec in args.neurons for t in spec.split(",") if t]
    upstream = None
    if args.upstream:
        upstream = {layer: args.upstream for layer in layers}
    out = _out(args, "circuits-pages")
    index = build_pages(
        model, layers, out, neurons=neurons, upstream=upstream, top_k=args.top_k,
        render_kwargs=_render_kwargs(args), cache=_cache(args),
        dataset=False if args.no_dataset else None, dataset_size=args.dataset_size,
        factor_threshold=args.factor_threshold, progress=_progress(args),
    )
    print(f"Neuron pages written. Open {index.resolve().as_uri()}")
    return 0


def _overrides(items: Optional[Sequence[str]]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import yaml

    path = Path(args.config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    shortcuts = {k: getattr(args, k) for k in ("weights", "sha256", "device", "out") if getattr(args, k, None) is not None}
    overrides = {**shortcuts, **_overrides(args.set)}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if isinstance(raw, dict) and "experiment" in raw and "command" not in raw:
        from .experiment import run_experiment

        result = run_experiment(path, overrides)
        for f in result.get("files", []):
            print(f)
        return 0
    argv = config_to_argv(path, parser, overrides)
    print(f"circuits {' '.join(argv)}")
    return main(argv)


# ----------------------------------------------------------------------------- configs


def config_to_argv(
    path: Union[str, Path], parser: Optional[argparse.ArgumentParser] = None, overrides: Optional[dict[str, Any]] = None
) -> list[str]:
    """Read a YAML config (``command:`` plus that command's arguments) into an argv list.

    Keys are the long option names (``top_k`` or ``top-k``); positional arguments use their
    names (``targets``, ``target``, ``type``, ``layer``, ``from_layer``/``to_layer`` for
    ``expand``). Lists become repeated values, ``true`` a flag, ``false``/``null`` nothing.
    """
    import yaml

    parser = parser or build_parser()
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UsageError(f"{p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(cfg, dict) or "command" not in cfg:
        raise UsageError(f"{p} needs a 'command:' key (one of: {', '.join(_COMMANDS)})")
    cfg = dict(cfg, **(overrides or {}))
    command = str(cfg.pop("command"))
    sub = _subparsers(parser).get(command)
    if sub is None or command == "run":
        raise UsageError(f"{p}: unknown command {command!r}; use one of: {', '.join(c for c in _COMMANDS if c != 'run')}")
    positionals = [a for a in sub._actions if not a.option_strings]
    options = {}
    for a in sub._actions:
        for s in a.option_strings:
            if s.startswith("--"):
                options[s[2:].replace("-", "_")] = (s, a)
    argv = [command]
    for a in positionals:
        if a.dest in cfg:
            v = cfg.pop(a.dest)
            argv += [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
    for key, v in cfg.items():
        k = str(key).replace("-", "_")
        if k not in options:
            known = sorted(set(options) | {a.dest for a in positionals} - {"help"})
            raise UsageError(f"{p}: unknown key {key!r} for '{command}'; known keys: {', '.join(known)}")
        flag, action = options[k]
        if v is None or v is False:
            continue
        if v is True and action.nargs == 0:
            argv.append(flag)
        elif isinstance(v, (list, tuple)):
            argv += [flag] + [str(x) for x in v]
        else:
            argv += [flag, str(v)]
    return argv


# ----------------------------------------------------------------------------- parser


_COMMANDS: dict[str, str] = {
    "explore": "build the neuron pages for the model's most interesting layers (the main job)",
    "figure": "one figure for a neuron (small multiples, factors, family grid, spatial positions, NMF, heatmap)",
    "render": "feature visualizations to PNG",
    "nmf": "NMF pictures (3 spatial factors as RGB) of a layer's neurons",
    "expand": "expanded weights between two layers: .npz and top inputs",
    "layers": "list layers with output shapes and parameter counts",
    "inspect": "per-layer weight statistics and plots",
    "run": "run a YAML config (command: plus arguments), e.g. configs/explore_fashion.yaml",
}


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    g = p.add_argument_group("model and output")
    g.add_argument("--model", default="fashion-inception",
                   help="model name (fashion-inception, inceptionv1, a torchvision name) or a weights file (default: %(default)s)")
    g.add_argument("--weights", default=None, help="weights file or https:// URL for --model NAME")
    g.add_argument("--sha256", default=None, help="expected sha256 of the weights (required for URLs)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    g.add_argument("--out", default=None, help=out_help)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: 1 for small models such as fashion-inception, whose "
                        "tiny convolutions gain nothing from threads and slow down a lot on a busy CPU; else torch's default)")


def _render_opts(p: argparse.ArgumentParser, steps: int) -> None:
    g = p.add_argument_group("feature visualization")
    g.add_argument("--steps", type=int, default=steps, help="optimisation steps per image (default: %(default)s)")
    g.add_argument("--size", type=int, default=None, help="image side (default: the model's, at most 128)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--cache", default=None, help="feature-visualization cache folder (default: ~/.cache/circuits/featurevis)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the cache")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser for ``circuits``."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Circuits-style interpretability for PyTorch models: look at the weights.",
        epilog="Start with `circuits explore`, then open the index.html it prints.",
    )
    parser.add_argument("--version", action="version", version=f"circuits {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("explore", help=_COMMANDS["explore"], description=_COMMANDS["explore"])
    p.add_argument("--layers", nargs="+", default=None, help="layers to page (default: mixed3a mixed3b mixed4a)")
    p.add_argument("--per-layer", type=positive_int, default=3, help="neurons per layer, evenly spread over the branches (default: %(default)s)")
    p.add_argument("--neurons", nargs="+", default=None, help="exact neurons instead, e.g. mixed3b:60 mixed4a:12")
    p.add_argument("--upstream", nargs="+", default=None, help="upstream layers for every paged layer (default: previous block + bottlenecks)")
    p.add_argument("--top-k", type=positive_int, default=50, help="connections shown per upstream layer (default: %(default)s)")
    p.add_argument("--factor-threshold", type=_fraction, default=0.8,
                   help="order by NMF factor when 3 factors explain at least this much (default: %(default)s)")
    p.add_argument("--dataset-size", type=positive_int, default=1000, help="Fashion-MNIST test images scanned for dataset examples (default: %(default)s)")
    p.add_argument("--no-dataset", action="store_true", help="no dataset examples")
    _render_opts(p, steps=48)
    _common(p, "folder for the site (default: ./circuits-pages)")
    p.set_defaults(handler=cmd_explore)

    p = sub.add_parser("figure", help=_COMMANDS["figure"], description=_COMMANDS["figure"])
    p.add_argument("type", choices=FIGURE_TYPES, help="figure type")
    p.add_argument("target", help="the neuron, layer:channel, e.g. mixed3b:60")
    p.add_argument("--from", dest="from_layer", default=None, help="upstream layer (default: the previous block)")
    p.add_argument("--top", type=positive_int, default=12, help="input neurons shown (default: %(default)s)")
    p.add_argument("--neurons", default=None, help="family: output channels, e.g. 60-63")
    p.add_argument("--inputs", default=None, help="family: input channels (default: the --top strongest)")
    p.add_argument("--k", type=positive_int, default=3, help="NMF factors (default: %(default)s)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png", help="when --out is a folder (default: %(default)s)")
    _render_opts(p, steps=128)
    _common(p, "output file (.png/.svg/.pdf) or folder (default: ./figures)")
    p.set_defaults(handler=cmd_figure)

    p = sub.add_parser("render", help=_COMMANDS["render"], description=_COMMANDS["render"])
    p.add_argument("targets", nargs="+", help="neurons, e.g. mixed3b:60 mixed4a:12")
    p.add_argument("--scale", type=positive_int, default=4, help="PNG upscaling factor (default: %(default)s)")
    _render_opts(p, steps=256)
    _common(p, "folder for the PNGs (default: ./renders)")
    p.set_defaults(handler=cmd_render)

    p = sub.add_parser("nmf", help=_COMMANDS["nmf"], description=_COMMANDS["nmf"])
    p.add_argument("layer", help="layer whose neurons are factored, e.g. mixed3b")
    p.add_argument("--from", dest="from_layer", default=None, help="upstream layer (default: the previous block)")
    p.add_argument("--channels", default=None, help="channels, e.g. 0-15,40 (default: the first 16)")
    p.add_argument("--k", type=positive_int, default=3, help="factors (default: %(default)s)")
    p.add_argument("--format", choices=("png", "svg", "pdf"), default="png")
    _common(p, "folder for the figure (default: ./nmf)")
    p.set_defaults(handler=cmd_nmf)

    p = sub.add_parser("expand", help=_COMMANDS["expand"], description=_COMMANDS["expand"])
    p.add_argument("from_layer", help="upstream layer, e.g. mixed3a")
    p.add_argument("to_layer", help="downstream layer, e.g. mixed3b")
    p.add_argument("--channels", default=None, help="output channels, e.g. 0-7 (default: all)")
    p.add_argument("--top", type=positive_int, default=10, help="top inputs printed per output channel (default: %(default)s)")
    p.add_argument("--show", type=positive_int, default=8, help="output channels printed (default: %(default)s)")
    _common(p, "the .npz file or a folder (default: ./expanded_FROM_to_TO.npz)")
    p.set_defaults(handler=cmd_expand)

    p = sub.add_parser("layers", help=_COMMANDS["layers"], description=_COMMANDS["layers"])
    p.add_argument("--leaves", action="store_true", help="only modules without children")
    p.add_argument("--filter", default=None, help="only layers whose name contains this")
    _common(p, "(unused)")
    p.set_defaults(handler=cmd_layers)

    try:
        from .inspect.report import add_inspect_subcommand, run_inspect_command
    except ImportError:  # pragma: no cover - the module is part of the package
        p = sub.add_parser("inspect", help=_COMMANDS["inspect"])
        p.set_defaults(raw_handler=lambda args: _fail("circuits.inspect.report is not available in this installation", 1))
    else:
        p = add_inspect_subcommand(sub)
        p.set_defaults(raw_handler=run_inspect_command)

    try:
        from .atlas.cli import add_atlas_subcommand, run_atlas_command
    except ImportError:  # pragma: no cover - optional part of the package
        pass
    else:
        p = add_atlas_subcommand(sub)
        p.set_defaults(raw_handler=run_atlas_command)

    p = sub.add_parser("run", help=_COMMANDS["run"], description=_COMMANDS["run"])
    p.add_argument("config", help="YAML file with a 'command:' key and that command's arguments "
                                  "(or an 'experiment:' key: runs experiments/<name>.py)")
    p.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="override config values, e.g. steps=16 out=/tmp/x")
    for opt, what in (("weights", "weights file or https:// URL, e.g. inception5h.pth"), ("sha256", "expected sha256 of the weights"),
                      ("device", "torch device"), ("out", "output folder")):
        p.add_argument(f"--{opt}", default=None, help=f"shortcut for --set {opt}=...: {what}")
    p.set_defaults(raw_handler=None, run_config=True)
    return parser


def _set_threads(args: argparse.Namespace, model: Any) -> None:
    import torch

    from .models import input_shape

    n = getattr(args, "threads", None)
    if n is None and str(getattr(args, "device", "cpu")).startswith("cpu") and max(input_shape(model)[1:]) <= 64:
        n = 1
    if n is not None:
        torch.set_num_threads(n)


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _one_line(exc: BaseException) -> str:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args and not hasattr(exc, "message") else str(exc)
    msg = msg.strip().splitlines()[0] if msg.strip() else type(exc).__name__
    return msg


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not args.command:
        parser.print_help()
        return 2
    from .layers import UnknownLayerError
    from .models import WeightsError

    try:
        if getattr(args, "run_config", False):
            return cmd_run(args, parser)
        raw: Optional[Callable[[argparse.Namespace], int]] = getattr(args, "raw_handler", None)
        if raw is not None:
            return int(raw(args))
        model = load_model_arg(args.model, args.weights, args.sha256, args.device)
        _set_threads(args, model)
        return int(args.handler(args, model))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except (UnknownLayerError, WeightsError, FileNotFoundError, PermissionError, NotADirectoryError,
            IsADirectoryError, ValueError) as exc:
        if getattr(args, "debug", False):
            raise
        return _fail(_one_line(exc), 2)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if getattr(args, "debug", False):
            raise
        return _fail(f"{type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", 1)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
