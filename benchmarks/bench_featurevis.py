"""Feature visualization throughput: ``circuits.featurevis.render`` vs Lucent's ``render_vis``.

Same random-init InceptionV1 weights in both (ours with ``lrn="lucent"``, numerically identical
to Lucent's model), 16 ``mixed4a`` channels, a 128 px Fourier parameterization resized to
224 px, Lucid's transforms, Adam lr 0.05, the same number of steps. Peers:

* Lucent one neuron at a time: ``render_vis(model, "mixed4a:n", param.image(128))``;
* Lucent batched: ``param.image(128, batch=B)`` with ``sum(objectives.channel("mixed4a", n, batch=i))``.

Reported: neurons per second and the activation each method reaches (channel mean of the final
image, evaluated by our model with ordinary ReLUs on the image resized to 224 px).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch

from circuits.featurevis import render
from circuits.featurevis import objective_values
from circuits.models import InceptionV1

from .common import report


def models(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``(ours, lucent)``: random-init InceptionV1 with identical weights, both in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lucent.modelzoo.inceptionv1.InceptionV1 import InceptionV1 as LucentInceptionV1
    torch.manual_seed(seed)
    ours = InceptionV1(lrn="lucent").eval()
    theirs = LucentInceptionV1(redirected_ReLU=True)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs.eval()


def lucent_one_at_a_time(model: torch.nn.Module, layer: str, channels: list[int], steps: int, size: int, seed: int = 0,
                         fixed_image_size: int | None = None) -> np.ndarray:
    """Images ``[N, C, H, W]`` rendered by Lucent, one ``render_vis`` call per neuron."""
    from lucent.optvis import param, render as lrender

    np.random.seed(seed)
    torch.manual_seed(seed)
    out = []
    for ch in channels:
        imgs = lrender.render_vis(model, f"{layer}:{ch}", lambda: param.image(size), thresholds=(steps,),
                                  show_image=False, progress=False, fixed_image_size=fixed_image_size)
        out.append(imgs[-1][0])
    return np.stack(out).transpose(0, 3, 1, 2)


def lucent_batched(model: torch.nn.Module, layer: str, channels: list[int], steps: int, size: int, seed: int = 0,
                   fixed_image_size: int | None = None) -> np.ndarray:
    """Images ``[N, C, H, W]`` rendered by Lucent in one batch with per-element channel objectives."""
    from lucent.optvis import objectives, param, render as lrender

    np.random.seed(seed)
    torch.manual_seed(seed)
    obj = sum(objectives.channel(layer, ch, batch=i) for i, ch in enumerate(channels))
    imgs = lrender.render_vis(model, obj, lambda: param.image(size, batch=len(channels)), thresholds=(steps,),
                              show_image=False, progress=False, fixed_image_size=fixed_image_size)
    return imgs[-1].transpose(0, 3, 1, 2)


def activations(model: torch.nn.Module, targets: list[str], images: np.ndarray | torch.Tensor, resize: int) -> torch.Tensor:
    """Objective ``i`` on image ``i`` (``[N]``), images resized to ``resize`` px as in rendering."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    x = torch.nn.functional.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    vals = objective_values(model, targets, x, batch_size=8)
    return vals.diagonal()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--resize", type=int, default=224)
    p.add_argument("--layer", default="mixed4a")
    p.add_argument("--skip-single", action="store_true", help="skip Lucent one-at-a-time (slowest)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ours_model, lucent_model = models()
    chans = list(range(args.channels))
    targets = [f"{args.layer}:{c}" for c in chans]
    kw = dict(steps=args.steps, size=args.size, resize_to=args.resize, transforms="lucid", progress=False)

    render(ours_model, targets[:1], **dict(kw, steps=1))  # warm-up (allocator, FFT plans)
    t0 = time.perf_counter()
    ours = render(ours_model, targets, **kw)
    t_ours = time.perf_counter() - t0
    a_ours = activations(ours_model, targets, ours.images, args.resize)

    t0 = time.perf_counter()
    lb = lucent_batched(lucent_model, args.layer, chans, args.steps, args.size)
    t_lb = time.perf_counter() - t0
    a_lb = activations(ours_model, targets, lb, args.resize)

    n = len(chans)
    extra = f"{n} x {args.layer}, {args.steps} steps, {args.size}px->{args.resize}px"
    results = {
        "ours_s": t_ours, "lucent_batched_s": t_lb,
        "ours_median_act": statistics.median(a_ours.tolist()),
        "lucent_batched_median_act": statistics.median(a_lb.tolist()),
    }
    results["vs_batched"] = report("featurevis neurons/s vs Lucent batched", "lucent render_vis batch", t_lb, t_ours, extra=extra)
    if not args.skip_single:
        t0 = time.perf_counter()
        ls = lucent_one_at_a_time(lucent_model, args.layer, chans, args.steps, args.size)
        t_ls = time.perf_counter() - t0
        a_ls = activations(ours_model, targets, ls, args.resize)
        results.update(lucent_single_s=t_ls, lucent_single_median_act=statistics.median(a_ls.tolist()))
        results["vs_single"] = report("featurevis neurons/s vs Lucent one at a time", "lucent render_vis x1", t_ls, t_ours, extra=extra)
    print(
        f"[featurevis] neurons/s: circuits {n / t_ours:.3f}, lucent batched {n / t_lb:.3f}"
        + (f", lucent one-at-a-time {n / results['lucent_single_s']:.3f}" if "lucent_single_s" in results else "")
        + f" | median activation: circuits {results['ours_median_act']:.3f}, lucent batched "
        f"{results['lucent_batched_median_act']:.3f}"
        + (f", lucent one-at-a-time {results['lucent_single_median_act']:.3f}" if "lucent_single_median_act" in results else ""),
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
