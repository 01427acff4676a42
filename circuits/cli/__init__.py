"""The ``circuits`` command line: a thin layer over the library.

::

    circuits explore                      # neuron pages for the default model; prints where to open them
    circuits layers --model resnet18      # layers with output shapes and parameter counts
    circuits render mixed3b:12 mixed3b:40 --steps 128 --out renders/
    circuits figure small-multiples mixed3b:60 --from mixed3a --top 12 --out fig.png
    circuits nmf mixed3b --from mixed3a
    circuits expand mixed3a mixed3b --channels 60 --top 10 --out e.npz
    circuits inspect fashion-inception    # or a checkpoint file: no model code needed
    circuits atlas --out atlas/           # every neuron's page for whole layers (resumable, Ray)
    circuits run configs/explore_fashion.yaml

Every model command takes the same options: ``--model`` (a name, or a weights file whose
architecture is recognised), ``--weights``, ``--sha256``, ``--device``, ``--out``, ``--quiet``,
``--threads``. Exit status (one place, :func:`main`): 0 success; 2 bad input (one line on
stderr, no traceback); 3 an atlas run stopped early on purpose; 130 interrupted; 1 an internal
error (``--debug`` shows the traceback).

The parser (:mod:`circuits.cli.parser`) imports no torch, so ``circuits --help`` is quick; a
command's handler (:mod:`circuits.cli.commands`) imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .parser import COMMANDS, PROG, UsageError, build_parser, parse_channels, subparsers

__all__ = ["main", "build_parser", "config_to_argv", "parse_channels", "UsageError"]


def _bad_input_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user's input was wrong (exit status 2)."""
    from ..layers import UnknownLayerError
    from ..models import WeightsError

    return (UsageError, ValueError, UnknownLayerError, WeightsError, FileNotFoundError, PermissionError,
            NotADirectoryError, IsADirectoryError, FileExistsError)


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args and not hasattr(exc, "message") else str(exc)
    text = text.strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 3 stopped early, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not args.command:
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False)
    try:
        if args.command == "run":
            return _cmd_run(args, parser)
        from .commands import HANDLERS

        return int(HANDLERS[args.command](args))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the one place where errors become exit codes
        if debug:
            raise
        from ..atlas import AtlasTaskError

        if isinstance(exc, AtlasTaskError):
            return _fail(f"{exc} (finished tasks are kept; run the same command again to continue)", 1)
        if isinstance(exc, _bad_input_types()):
            return _fail(_one_line(exc), 2)
        if isinstance(exc, ImportError) and "pip install" in str(exc):
            return _fail(_one_line(exc), 2)  # an optional dependency the command needs
        return _fail(f"{type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", 1)


# ----------------------------------------------------------------------------- configs


def _set_options(items: Optional[Sequence[str]]) -> dict[str, Any]:
    from ..experiment import ExperimentError, parse_overrides

    try:
        return parse_overrides(items)
    except ExperimentError as e:
        raise UsageError(str(e)) from None


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .._io import read_yaml

    path = Path(args.config).expanduser()
    shortcuts = {k: getattr(args, k) for k in ("weights", "sha256", "device", "out") if getattr(args, k, None) is not None}
    overrides = {**shortcuts, **_set_options(args.set)}
    raw = read_yaml(path)
    if isinstance(raw, dict) and "experiment" in raw and "command" not in raw:
        from ..experiment import run_experiment

        result = run_experiment(path, overrides)
        for f in result.get("files", []):
            print(f)
        return 0
    argv = config_to_argv(path, parser, overrides)
    print(f"{PROG} {' '.join(argv)}")
    return main(argv)


def config_to_argv(
    path: Union[str, Path], parser: Optional[argparse.ArgumentParser] = None, overrides: Optional[dict[str, Any]] = None
) -> list[str]:
    """Read a YAML config (``command:`` plus that command's arguments) into an argv list.

    Keys are the long option names (``top_k`` or ``top-k``); positional arguments use their
    names (``targets``, ``target``, ``type``, ``layer``, ``from_layer``/``to_layer`` for
    ``expand``). Lists become repeated values, ``true`` a flag, ``false``/``null`` nothing.
    An unknown key is an error that lists the known ones.
    """
    from .._io import read_yaml

    parser = parser or build_parser()
    p = Path(path).expanduser()
    cfg = read_yaml(p)
    if not isinstance(cfg, dict) or "command" not in cfg:
        raise UsageError(f"{p} needs a 'command:' key (one of: {', '.join(c for c in COMMANDS if c != 'run')})")
    cfg = dict(cfg, **(overrides or {}))
    command = str(cfg.pop("command"))
    sub = subparsers(parser).get(command)
    if sub is None or command == "run":
        raise UsageError(f"{p}: unknown command {command!r}; use one of: {', '.join(c for c in COMMANDS if c != 'run')}")
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
