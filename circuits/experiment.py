"""Run an experiment script from a YAML config: ``experiment: <name>`` → ``experiments/<name>.py``.

A config is a YAML mapping with an ``experiment:`` key naming a script in the repository's
``experiments/`` folder; the script defines ``run(config: dict) -> dict``. Everything else
in the mapping is the script's business (model, weights, layers, neurons, render settings,
output folder). :func:`run_experiment` reads the YAML, applies overrides, finds the script
and calls it::

    from circuits.experiment import run_experiment
    result = run_experiment("configs/fig10_expanded_factors_fashion.yaml",
                            {"render.steps": 16, "out": "/tmp/fig10"})
    result["files"]          # what it wrote (PNG/SVG figures, .npz/.json numbers)

Where the script is looked for (first hit wins):

1. ``$CIRCUITS_EXPERIMENTS_DIR/<name>.py``;
2. ``<config folder>/../experiments/<name>.py`` (the repository of the config file);
3. ``<package folder>/../experiments/<name>.py`` (a source checkout of ``circuits``);
4. ``./experiments/<name>.py`` (the working directory).

Overrides are a mapping; a key with dots sets a nested value (``"render.steps": 2`` sets
``config["render"]["steps"]``), and a mapping value is merged into a mapping. The script
receives the merged config plus ``_config_path`` (the YAML file, or ``None``) and
``_config_dir`` (its folder, for resolving relative paths; ``None`` for a dict).

A script may declare the keys it reads in a module-level ``OPTIONS`` mapping (key → a
one-line description, or, for a nested mapping such as ``render:``, the collection of its
valid sub-keys). The runner then refuses any other key before the script runs, naming the
valid ones (:func:`validate_config`): ``render: {stepz: 4}`` is an error, not 512 silent
steps. :func:`check_config` does that for a config file without running it.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Collection, Mapping, Optional, Sequence, Union

__all__ = ["run_experiment", "load_config", "apply_overrides", "parse_overrides", "find_experiment", "validate_config", "check_config", "ExperimentError"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ALWAYS = ("experiment", "_config_path", "_config_dir")


class ExperimentError(ValueError):
    """A config or experiment script that cannot be run; the message says why."""


def load_config(config: Union[str, os.PathLike, Mapping[str, Any]]) -> dict[str, Any]:
    """A config as a dict: read a YAML file, or deep-copy a mapping.

    Adds ``_config_path`` and ``_config_dir`` (``None`` for a mapping unless it has them).
    Raises :class:`ExperimentError` for a missing file, invalid YAML, a non-mapping document
    or a missing ``experiment:`` key.
    """
    if isinstance(config, Mapping):
        cfg = _copy(dict(config))
        cfg.setdefault("_config_path", None)
        cfg.setdefault("_config_dir", None)
    elif isinstance(config, (str, os.PathLike)):
        from ._io import ConfigError, read_yaml

        path = Path(config).expanduser()
        try:
            doc = read_yaml(path)
        except ConfigError as exc:
            raise ExperimentError(str(exc)) from None
        if not isinstance(doc, dict):
            raise ExperimentError(f"{path} must hold a YAML mapping (key: value lines); got {type(doc).__name__}")
        cfg = doc
        cfg["_config_path"] = str(path.resolve())
        cfg["_config_dir"] = str(path.resolve().parent)
    else:
        raise TypeError(f"config must be a path to a YAML file or a mapping; got {type(config).__name__}")
    if "experiment" not in cfg:
        where = cfg.get("_config_path") or "the config"
        raise ExperimentError(f"{where} has no 'experiment:' key naming a script in experiments/ (e.g. experiment: fig10_expanded_factors)")
    return cfg


def _copy(d: dict[str, Any]) -> dict[str, Any]:
    """Deep copy, except objects that should be shared (models and tensors are kept as is)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = _copy(v)
        elif isinstance(v, (list, tuple, str, int, float, bool, type(None))):
            out[k] = copy.deepcopy(v)
        else:
            out[k] = v
    return out


def parse_overrides(items: Optional[Sequence[str]]) -> dict[str, Any]:
    """``["render.steps=2", "out=/tmp/x"]`` (``--set`` options) → ``{"render.steps": 2, "out": "/tmp/x"}``.

    Values are read as YAML (numbers, booleans, lists); a value YAML cannot read stays a
    string. An item without ``=`` is an :class:`ExperimentError`.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ExperimentError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def apply_overrides(config: dict[str, Any], overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge ``overrides`` into ``config`` (in place, also returned).

    ``{"render.steps": 2}`` sets ``config["render"]["steps"]``; a mapping value is merged into
    an existing mapping (``{"render": {"steps": 2}}`` keeps the other render keys).
    """
    if not overrides:
        return config
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a mapping; got {type(overrides).__name__}")
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ExperimentError(f"override keys must be non-empty strings; got {key!r}")
        parts = key.split(".")
        node = config
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            elif not isinstance(nxt, dict):
                raise ExperimentError(f"override {key!r}: {p!r} is {type(nxt).__name__}, not a mapping")
            node = nxt
        last = parts[-1]
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            apply_overrides(node[last], {k: v for k, v in value.items()})
        else:
            node[last] = value
    return config


def _search_dirs(config: Mapping[str, Any]) -> list[Path]:
    dirs: list[Path] = []
    env = os.environ.get("CIRCUITS_EXPERIMENTS_DIR")
    if env:
        dirs.append(Path(env).expanduser())
    if config.get("_config_dir"):
        dirs.append(Path(config["_config_dir"]).parent / "experiments")
    dirs.append(Path(__file__).resolve().parent.parent / "experiments")
    dirs.append(Path.cwd() / "experiments")
    seen: list[Path] = []
    for d in dirs:
        if d not in seen:
            seen.append(d)
    return seen


def find_experiment(name: str, config: Optional[Mapping[str, Any]] = None) -> Path:
    """Path of ``experiments/<name>.py`` (see the module docs for the search order)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ExperimentError(f"experiment must be a script name like 'fig10_expanded_factors' (letters, digits, _); got {name!r}")
    dirs = _search_dirs(config or {})
    for d in dirs:
        p = d / f"{name}.py"
        if p.is_file():
            return p
    available = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.py") if not p.stem.startswith("_")})
    import difflib

    close = difflib.get_close_matches(name, available, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ExperimentError(
        f"no experiment script {name}.py in {', '.join(str(d) for d in dirs)}.{hint} "
        "Set CIRCUITS_EXPERIMENTS_DIR to the folder that holds it"
    )


def _import(path: Path) -> ModuleType:
    # experiments import their shared helpers as ``_common``: make the folder importable
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    mod_name = f"circuits_experiments.{path.stem}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise ExperimentError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    spec.loader.exec_module(module)
    return module


def _unknown(keys: Collection[str], valid: Collection[str], where: str) -> None:
    import difflib

    bad = sorted(str(k) for k in keys if k not in valid)
    if not bad:
        return
    hints = []
    for k in bad:
        close = difflib.get_close_matches(k, [str(v) for v in valid], n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    shown = sorted(str(v) for v in valid if not str(v).startswith("_"))
    raise ExperimentError(f"{where}: unknown key{'s' if len(bad) > 1 else ''} {', '.join(hints)}; valid keys: {', '.join(shown)}")


def validate_config(config: Mapping[str, Any], options: Mapping[str, Any], where: str = "config") -> None:
    """Refuse keys a script does not read.

    ``options`` maps each valid top-level key to a description (a string) or, for a key whose
    value is a mapping (``render``, ``nmf``...), to the collection of its valid sub-keys.
    ``experiment`` and the runner's ``_config_*`` keys are always valid.

    Raises:
        ExperimentError: naming the unknown key, a close match, and the valid keys; or a
            nested key that should hold a mapping and does not.
    """
    _unknown(config.keys(), list(options) + list(_ALWAYS), where)
    for key, spec in options.items():
        if isinstance(spec, str) or key not in config or config[key] is None:
            continue
        value = config[key]
        if not isinstance(value, Mapping):
            raise ExperimentError(f"{where}: {key!r} must be a mapping of {', '.join(sorted(spec))}; got {value!r}")
        _unknown(value.keys(), list(spec), f"{where}: {key}")


def _load_script(cfg: Mapping[str, Any]) -> tuple[Path, ModuleType]:
    path = find_experiment(cfg["experiment"], cfg)
    return path, _import(path)


def _check(cfg: Mapping[str, Any], path: Path, module: ModuleType) -> None:
    options = getattr(module, "OPTIONS", None)
    if options is not None:
        validate_config(cfg, options, cfg.get("_config_path") or f"{path.stem} config")


def check_config(
    config: Union[str, os.PathLike, Mapping[str, Any]],
    overrides: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Load a config, find its script and validate the keys against the script's ``OPTIONS``
    without running it; returns the merged config. Raises :class:`ExperimentError`."""
    cfg = apply_overrides(load_config(config), overrides)
    path, module = _load_script(cfg)
    _check(cfg, path, module)
    return cfg


def run_experiment(
    config: Union[str, os.PathLike, Mapping[str, Any]],
    overrides: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """Run the experiment a config names and return what its ``run`` returns (a dict).

    Args:
        config: a YAML file with an ``experiment:`` key, or the same as a mapping.
        overrides: values that replace the config's (dotted keys for nested values), e.g.
            ``{"weights": "inception5h.pth"}`` or ``{"render.steps": 2, "out": "/tmp/x"}``.

    Raises:
        ExperimentError: no such config/script, a key the script does not read (when it
            declares ``OPTIONS``), or a script without a ``run`` function.
    """
    cfg = apply_overrides(load_config(config), overrides)
    path, module = _load_script(cfg)
    _check(cfg, path, module)
    fn = getattr(module, "run", None)
    if not callable(fn):
        raise ExperimentError(f"{path} has no run(config) function")
    result = fn(cfg)
    if not isinstance(result, dict):
        raise ExperimentError(f"{path}: run(config) returned {type(result).__name__}, expected a dict")
    return result
