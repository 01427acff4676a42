"""Feature visualization options: which ones are worth shipping as defaults on this machine.

Issue 18 asks which of learning-rate schedules, channels-last, reduced precision on the CPU
and ``torch.compile`` make an equally good image faster. For each target set of
:mod:`benchmarks.bench_featurevis` (``inceptionv1``: 16 random-init InceptionV1 ``mixed4a``
channels at 128 px; ``fashion``: 16 ``mixed4a`` channels of the bundled model at 28 px) every
option renders the same targets with the same seeds for ``--steps`` steps, one after the other
in one process, warmed up first. Printed per option:

* ``ms/step`` and the ratio to the library defaults (above 1: faster);
* the median objective of the final images (evaluated alike, ordinary ReLUs);
* ``Δ image``: mean absolute pixel difference from the defaults' images (0 to 1 scale), to
  see whether an option keeps the images (reduced precision) or changes them (a schedule);
* ``not positive``: images whose objective is ≤ 0.

An option that resolves to the same render as an earlier one (at 28 px the defaults already
are the cosine schedule from lr 0.1) is reported as such (``same_as``), not run twice.

Options: ``nchw`` (``channels_last=False``; the CPU default is channels-last), ``bf16``
(``mixed_precision=True``: bfloat16 autocast where the CPU has native bfloat16), ``cosine``
(``schedule="cosine", lr=0.1``), ``compile`` (the model's forward compiled in place with
``torch.compile``, everything else the defaults; the compile time is reported apart).

    python -m benchmarks featurevis_options --sets inceptionv1,fashion --steps 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Optional

import torch

from circuits.featurevis import render

from .bench_featurevis import activations, fashion_set, inceptionv1_set, render_key

#: Options timed against the library defaults (``render`` keyword arguments; ``compile`` is
#: handled here, by compiling the model).
OPTIONS: dict[str, dict] = {
    "defaults": {},
    "nchw": {"channels_last": False},
    "bf16": {"mixed_precision": True},
    "cosine": {"schedule": "cosine", "lr": 0.1},
    "compile": {"compile": True},
}


def _compiled(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` whose forward is compiled in place (``nn.Module.compile``: module
    names unchanged, so layer names still resolve); compilation happens at the first call."""
    m = copy.deepcopy(model)
    m.compile()
    return m


def option_study(ts, steps: int, options: dict[str, dict]) -> dict[str, dict]:
    """Render ``ts``'s targets with each option; returns ``{option: {...}}`` (see the module doc)."""
    targets = ts.targets
    out: dict[str, dict] = {}
    base_images: Optional[torch.Tensor] = None
    seen: dict[str, str] = {}
    for name, kw in options.items():
        kw = dict(kw)
        compiled = bool(kw.pop("compile", False))
        settings = ts.settings(**kw)
        request = render_key(ts, settings, compiled=compiled)
        if request in seen:  # e.g. at 28 px the defaults already are the cosine schedule from lr 0.1
            print(f"[featurevis options {ts.name}] {name}: the same render as {seen[request]!r}", flush=True)
            out[name] = {**out[seen[request]], "same_as": seen[request]}
            continue
        seen[request] = name
        model = _compiled(ts.ours) if compiled else ts.ours
        t0 = time.perf_counter()
        try:
            render(model, targets, settings.replace(steps=2), progress=False)  # warm-up (and compilation)
        except Exception as e:  # an option this machine cannot run is reported, not fatal
            print(f"[featurevis options {ts.name}] {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = render(model, targets, settings.replace(steps=steps), progress=False)
        seconds = time.perf_counter() - t0
        values = activations(ts.ours, targets, res.images, ts.resize)
        median = statistics.median(values.tolist())
        if base_images is None:
            base_images = res.images
        delta = float((res.images - base_images).abs().mean())
        entry = {"seconds": seconds, "ms_per_step": seconds / steps * 1000, "median": median, "delta": delta,
                 "not_positive": int((values <= 0).sum()), "warmup_s": warm_s, "amp": res.settings.mixed_precision}
        base = out.get("defaults", entry)
        entry["speedup"] = base["ms_per_step"] / entry["ms_per_step"]
        out[name] = entry
        print(f"[featurevis options {ts.name}] {name}: {entry['ms_per_step']:.0f} ms/step (x{entry['speedup']:.2f} vs defaults), "
              f"median objective {median:.4f} at {steps} steps, Δ image {delta:.4f}, "
              f"{entry['not_positive']} of {len(targets)} not positive; warm-up {warm_s:.1f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="inceptionv1,fashion", help="target sets: inceptionv1, fashion")
    p.add_argument("--steps", type=int, default=64, help="steps per render")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--options", default=",".join(OPTIONS), help=f"options: {list(OPTIONS)} (defaults first)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n for n in args.options.split(",") if n]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown}; available: {list(OPTIONS)}")
    if names[0] != "defaults":
        names = ["defaults"] + [n for n in names if n != "defaults"]
    builders = {"inceptionv1": inceptionv1_set, "fashion": fashion_set}
    print(f"[featurevis options] {torch.get_num_threads()} torch thread(s)", flush=True)
    return {s: option_study(builders[s](args.channels), args.steps, {n: OPTIONS[n] for n in names})
            for s in args.sets.split(",")}


if __name__ == "__main__":
    main()
