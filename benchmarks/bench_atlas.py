"""Atlas throughput: neurons rendered per second by the local engine, by Ray with 2 workers, and
by Lucent one neuron at a time.

All three render the same ``mixed3a`` channels of the same random-init InceptionV1 (ours with
``lrn="lucent"``, Lucent's model loaded with the same state dict) at the same settings: a
``--size`` px Fourier image, Lucid's transforms, resized to ``--size`` px before the model,
Adam lr 0.05, ``--steps`` steps. The engines run the render tasks of an atlas plan (batches of
``--batch`` neurons, results written to a fresh store); Ray's time is reported with and without
starting its local cluster. Lucent: one ``render_vis`` call per neuron
(``fixed_image_size=--size``).

The GPU figure the issue asks for (every channel of InceptionV1 mixed3a–mixed4e at 128 px and
512 steps) needs a GPU and is not measured here; ``--dry-run-gpu`` prints the plan's size.

``--estimate``: how close the dry run's estimate comes to the run it estimates. For each
configuration of the bundled FashionInception atlas (``--configs``), ``--repeats`` times: a
fresh process makes the dry run (``build_atlas(dry_run=True)``), then another fresh process
makes the run into the same folder, as ``circuits atlas --dry-run`` and ``circuits atlas``
would; both time ``build_atlas`` after the model is loaded. Prints estimate ÷ measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from circuits.atlas import ResultStore, make_plan, run_local
from circuits.models import InceptionV1

from .common import machine, peak_memory_mib, report, reset_peak_memory, synchronize


def _models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1 as LucentInceptionV1
    torch.manual_seed(seed)
    ours = InceptionV1(lrn="lucent").eval()
    theirs = LucentInceptionV1(redirected_ReLU=True)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs.eval()


def _render_plan(model: torch.nn.Module, n: int, steps: int, size: int, batch: int):
    plan = make_plan(model, ["mixed3a"], neurons={"mixed3a": list(range(n))}, upstream_renders="none",
                     dataset=None, steps=steps, batch_size=batch,
                     render={"size": size, "resize_to": size})
    plan.tasks = plan.tasks_of("render")  # only the renders are timed
    return plan


def _lucent_one_at_a_time(model: torch.nn.Module, channels: list[int], steps: int, size: int) -> None:
    from lucent.optvis import param, render as lrender

    torch.manual_seed(0)
    np.random.seed(0)
    for ch in channels:
        lrender.render_vis(model, f"mixed3a:{ch}", lambda: param.image(size), thresholds=(steps,),
                           show_image=False, progress=False, fixed_image_size=size)


#: Atlas configurations for ``--estimate``: build_atlas arguments (FashionInception, CPU).
ESTIMATE_CONFIGS = {
    # the tests' atlas: 496 pages, 720 images of 2 steps, 64 dataset images; pages and overheads dominate
    "tests": dict(layers=["mixed3a", "mixed3b", "mixed4a"], steps=2, top_k=2, dataset_size=64, n_examples=3, seed=3),
    # renders dominate: mixed3a's 112 neurons and their 124 inputs, 48 steps
    "renders": dict(layers=["mixed3a"], steps=48, top_k=4, dataset_size=256, n_examples=4, seed=0),
    # the default page settings (top 50, 2000 dataset images, 8 examples) on 16 neurons per layer, 16 steps
    "defaults": dict(layers=["mixed3b", "mixed4a"], neurons=16, steps=16, seed=0),
}

_ESTIMATE_SCRIPT = """
import json, sys, time
from circuits.atlas import build_atlas
from circuits.models import load_model
cfg = json.loads(sys.argv[1])
model = load_model().eval()
layers = cfg.pop("layers")
result = build_atlas(model, layers, sys.argv[2], dry_run=sys.argv[3] == "dry", progress=False, **cfg)
out = {"seconds": result.seconds}
if result.estimate is not None:
    out["estimate"] = result.estimate.to_dict()
else:
    out["rendered"] = result.report.rendered
    out["by_kind"] = {}
    for r in result.report.results:
        out["by_kind"][r["kind"]] = out["by_kind"].get(r["kind"], 0.0) + r["seconds"]
    out["plan"] = result.plan_seconds
    out["pages"] = result.seconds - result.report.seconds - result.plan_seconds
print("RESULT " + json.dumps(out))
"""


def _atlas_process(config: dict, out: str, mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", _ESTIMATE_SCRIPT, json.dumps(config), out, mode],
                          capture_output=True, text=True, env=env, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"atlas {mode} process failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def estimate_accuracy(configs: list[str], repeats: int, threads: int) -> list[dict]:
    """Dry run then run, each in a fresh process, ``repeats`` times per configuration."""
    rows = []
    for name in configs:
        config = dict(ESTIMATE_CONFIGS[name], threads=threads)
        for i in range(repeats):
            with tempfile.TemporaryDirectory(prefix="bench-atlas-estimate-") as tmp:
                t0 = time.perf_counter()
                dry = _atlas_process(config, tmp, "dry")
                run = _atlas_process(config, tmp, "run")
                wall = time.perf_counter() - t0
            est = dry["estimate"]
            ratio = est["total_seconds"] / run["seconds"]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in est["seconds"].items())
            real = (f"plan {run['plan']:.1f}, " + ", ".join(f"{k} {v:.1f}" for k, v in run["by_kind"].items())
                    + f", pages and the rest {run['pages']:.1f}")
            print(f"[atlas estimate] {name} #{i + 1}: estimated {est['total_seconds']:.1f} s ({parts}) | measured "
                  f"{run['seconds']:.1f} s ({real}) | estimate/measured {ratio:.2f} | dry run {dry['seconds']:.1f} s "
                  f"| load average {os.getloadavg()[0]:.1f} | {wall:.0f} s with process start-ups", flush=True)
            rows.append({"config": name, "repeat": i + 1, "estimate_s": est["total_seconds"], "measured_s": run["seconds"],
                         "ratio": ratio, "estimate": est["seconds"], "measured": run["by_kind"], "pages_s": run["pages"],
                         "plan_s": run["plan"],
                         "dry_run_s": dry["seconds"]})
    within = sum(abs(r["ratio"] - 1) <= 0.3 for r in rows)
    print(f"[atlas estimate] {within} of {len(rows)} estimates within 30% of the measured time; ratios "
          + ", ".join(f"{r['ratio']:.2f}" for r in rows), flush=True)
    return rows


#: The GPU atlas the issue asks for: every channel of these InceptionV1 layers at 128 px / 512 steps.
GPU_ATLAS_LAYERS = ["mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"]


def projection(
    device: "str | torch.device" = "cuda",
    layers: Sequence[str] = tuple(GPU_ATLAS_LAYERS),
    *,
    steps: int = 512,
    size: int = 128,
    resize_to: Optional[int] = None,
    neurons: Optional[int] = None,
    batch: Optional[int] = None,
    devices: Sequence[int] = (1, 2, 4, 8),
    calibration_steps: int = 3,
    verbose: bool = True,
) -> dict:
    """Project the render time of the atlas of random-init InceptionV1 ``layers`` (every channel,
    or the first ``neurons`` of each) on ``device``, and check the projection on one real task.

    The plan's render tasks (no tables, examples or pages) are estimated by the dry run's
    calibration (:func:`circuits.atlas.estimate`: a few real steps per layer), and divided among
    ``devices`` GPUs (tasks of similar cost spread evenly; never more devices than tasks). Then
    the plan's first render task is estimated alone and run in full into a fresh store; its
    ``estimate ÷ measured`` says how far the projection can be trusted. Returns
    ``{"neurons", "tasks", "estimate_s", "by_devices": {N: seconds}, "task_estimate_s",
    "task_measured_s", "ratio", "task_neurons", "peak_mib", "calibration_s"}``.

    Example::

        >>> out = projection("cuda")                     # doctest: +SKIP
        >>> out["by_devices"][8], out["ratio"]           # doctest: +SKIP
    """
    import dataclasses

    from circuits.atlas import estimate
    from circuits.atlas.tasks import run_task

    dev = torch.device(device)
    torch.manual_seed(0)
    model = InceptionV1().eval().to(dev)
    chosen = None if neurons is None else {layer: list(range(neurons)) for layer in layers}
    plan = make_plan(model, list(layers), neurons=chosen, upstream_renders="none", dataset=None, steps=steps,
                     batch_size=batch, device=dev, render={"size": size, "resize_to": resize_to})
    plan.tasks = plan.tasks_of("render")
    whole = estimate(plan, model, pages=False, calibration_steps=calibration_steps)
    task = plan.tasks[0]
    one = estimate(dataclasses.replace(plan, tasks=[task]), model, pages=False, calibration_steps=calibration_steps)
    with tempfile.TemporaryDirectory(prefix="bench-atlas-projection-") as tmp:
        reset_peak_memory(dev)
        synchronize(dev)
        t0 = time.perf_counter()
        done = run_task(model, plan, task, ResultStore(tmp))
        synchronize(dev)
        measured = time.perf_counter() - t0
    if done["rendered"] != task.size:
        raise RuntimeError(f"the measured task rendered {done['rendered']} of its {task.size} images")
    total = whole.render_seconds
    n_tasks = len(plan.tasks)
    out = {"neurons": plan.n_neurons, "tasks": n_tasks, "layers": list(layers), "steps": steps, "size": size,
           "estimate_s": total, "by_devices": {n: total / min(n, n_tasks) for n in devices},
           "task_id": task.id, "task_neurons": task.size, "task_estimate_s": one.render_seconds,
           "task_measured_s": measured, "ratio": one.render_seconds / measured, "peak_mib": peak_memory_mib(dev),
           "calibration_s": whole.calibration_seconds + one.calibration_seconds, "device": str(dev)}
    if verbose:
        print(f"[atlas projection] {plan.n_neurons} neurons of {', '.join(layers)} at {size} px / {steps} steps on {dev}: "
              f"{n_tasks} render tasks, estimated {total:.1f} s on one device; "
              + ", ".join(f"{n} devices {s:.1f} s" for n, s in out["by_devices"].items())
              + f" | task {task.id} ({task.size} neurons): estimated {one.render_seconds:.2f} s, measured {measured:.2f} s, "
              f"estimate/measured {out['ratio']:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--neurons", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="neurons per render task")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the local engine and Lucent")
    p.add_argument("--workers", type=int, default=2, help="Ray CPU slots (one torch thread each)")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-lucent", action="store_true")
    p.add_argument("--dry-run-gpu", action="store_true", help="print the size of the mixed3a–mixed4e GPU plan and exit")
    p.add_argument("--estimate", action="store_true", help="compare the dry run's estimate with real runs, and exit")
    p.add_argument("--configs", nargs="+", default=list(ESTIMATE_CONFIGS), choices=list(ESTIMATE_CONFIGS),
                   help="--estimate: atlas configurations (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="--estimate: dry run + run pairs per configuration")
    args = p.parse_args(argv)
    if args.estimate:
        return {"estimate": estimate_accuracy(args.configs, args.repeats, args.threads), "machine": machine()}
    torch.set_num_threads(args.threads)
    ours, lucent_model = _models()
    results: dict = {"machine": machine(), "neurons": args.neurons, "steps": args.steps, "size": args.size}

    if args.dry_run_gpu:
        layers = ["mixed3a", "mixed3b", "mixed4a", "mixed4b", "mixed4c", "mixed4d", "mixed4e"]
        plan = make_plan(ours, layers, upstream_renders="none", dataset=None, steps=512, device="cuda",
                         device_free_bytes=70 * 1024**3, render={"size": 128})
        print(plan.summary())
        return {"gpu_plan_neurons": plan.n_neurons, "gpu_plan_tasks": len(plan.tasks)}

    n = args.neurons
    from circuits.featurevis import render

    render(ours, ["mixed3a:0"], steps=1, size=args.size, resize_to=args.size, progress=False)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        plan = _render_plan(ours, n, args.steps, args.size, args.batch)
        t0 = time.perf_counter()
        rep = run_local(plan, ours, ResultStore(f"{tmp}/local"), progress=False)
        t_local = time.perf_counter() - t0
        assert rep.rendered == n
        results["local_s"] = t_local
        print(f"[atlas] local engine: {n} neurons in {t_local:.2f} s = {n / t_local:.2f} neurons/s "
              f"({len(plan.tasks)} task(s) of {args.batch}, {args.threads} threads)", flush=True)

        if not args.skip_ray:
            import ray

            from circuits.atlas.ray_engine import run_ray

            t0 = time.perf_counter()
            ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
            t_init = time.perf_counter() - t0
            try:
                # warm the workers (process start, torch import) with a 1-step plan, not timed
                warm = _render_plan(ours, args.workers, 1, args.size, 1)
                run_ray(warm, ours, ResultStore(f"{tmp}/warm"), progress=False)
                t0 = time.perf_counter()
                rep = run_ray(plan, ours, ResultStore(f"{tmp}/ray"), progress=False)
                t_ray = time.perf_counter() - t0
            finally:
                ray.shutdown()
            assert rep.rendered == n
            results.update(ray_s=t_ray, ray_init_s=t_init)
            print(f"[atlas] ray, {args.workers} workers: {n} neurons in {t_ray:.2f} s = {n / t_ray:.2f} neurons/s "
                  f"(warm workers; cluster start {t_init:.1f} s not included)", flush=True)
            results["ray_vs_local"] = report("atlas ray vs local", "local engine", t_local, t_ray,
                                             extra=f"{n} x mixed3a, {args.steps} steps, {args.size}px")

    if not args.skip_lucent:
        t0 = time.perf_counter()
        _lucent_one_at_a_time(lucent_model, list(range(n)), args.steps, args.size)
        t_lucent = time.perf_counter() - t0
        results["lucent_single_s"] = t_lucent
        print(f"[atlas] lucent one at a time: {n} neurons in {t_lucent:.2f} s = {n / t_lucent:.2f} neurons/s", flush=True)
        results["local_vs_lucent"] = report("atlas local vs Lucent one at a time", "lucent render_vis x1", t_lucent,
                                            t_local, extra=f"{n} x mixed3a, {args.steps} steps, {args.size}px")
        if "ray_s" in results:
            results["ray_vs_lucent"] = report("atlas ray vs Lucent one at a time", "lucent render_vis x1", t_lucent,
                                              results["ray_s"], extra=f"{args.workers} workers")
    return results


if __name__ == "__main__":
    main()
