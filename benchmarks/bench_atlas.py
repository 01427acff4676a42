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
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import numpy as np
import torch

from circuits.atlas import ResultStore, make_plan, run_local
from circuits.models import InceptionV1

from .common import machine, report


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
    args = p.parse_args(argv)
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
