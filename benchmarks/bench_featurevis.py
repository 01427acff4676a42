"""Feature visualization, time to quality: ``circuits.featurevis.render`` vs Lucent's ``render_vis``.

A user waits for an equally good image, not for a number of steps. For each target set:

1. Lucent's batched mode (``param.image(size, batch=16)`` with one channel objective per batch
   element, Adam lr 0.05) runs 512 steps; its images are saved every ``--every`` steps.
2. The **quality bar** is the median objective Lucent's images reach at 512 steps (channel
   mean of the final image, evaluated by our model with ordinary ReLUs, the image resized to
   the model's input size; the same evaluation for every method).
3. Lucent's time to quality: the first saved step whose median reaches the bar, as a share of
   its 512-step wall time (its steps all cost the same).
4. Ours: ``render`` with the settings of each configuration (the library defaults, and the
   options it ships) at a ladder of step counts (``--ladder``); the time to quality is the
   wall time of the shortest run whose median reaches the bar (a run with a schedule is a
   different run at each length, so every rung is a fresh render, timed whole).

Target sets:

* ``inceptionv1``: random-init InceptionV1 (the same weights in both; ours ``lrn="lucent"``,
  numerically identical to Lucent's model), 16 ``mixed4a`` channels, 128 px Fourier images
  resized to 224 px, Lucid's transforms (Lucent's ``standard_transforms``; ours at 128 px).
* ``fashion``: the bundled FashionInception (``circuits.load_model()``), 16 ``mixed4a``
  channels, 28 px one-channel Fourier images; Lucent gets the transforms our defaults use at
  28 px (its own ``pad``/``jitter``) and the model's normalisation, so that both optimise the
  same problem (Lucent's 224 px transforms would shrink a 28 px image to half its size).

``python -m benchmarks featurevis`` prints one line per method and the ratio of times to
quality; ``--grid PATH`` writes a PNG grid (rows: Lucent at 512 steps, then ours at the step
count that reached the bar) to compare how the images look.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from circuits.featurevis import RenderSettings, cache_requests, objective_values, render
from circuits.featurevis.transforms import default_transforms
from circuits.models import InceptionV1, input_shape

from .common import peak_memory_mib, report, reset_peak_memory, synchronize

#: Configurations of ours that are timed: the library defaults, and shipped options. A
#: configuration that resolves to the same render as an earlier one (e.g. the defaults at 28 px
#: are already the cosine schedule from 0.1) is not run twice.
CONFIGS: dict[str, dict] = {
    "defaults": {},
    "cosine lr 0.1": {"lr": 0.1, "schedule": "cosine"},
    "cosine lr 0.1 bf16": {"lr": 0.1, "schedule": "cosine", "mixed_precision": True},
}


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


def _lucent_run(model: torch.nn.Module, layer: str, channels: list[int], steps: int, size: int, seed: int,
                batch: bool, thresholds: Sequence[int], **kw: object) -> list[np.ndarray]:
    from lucent.optvis import objectives, param, render as lrender

    np.random.seed(seed)
    torch.manual_seed(seed)
    image_channels = kw.pop("image_channels", None)
    obj = sum(objectives.channel(layer, ch, batch=i) for i, ch in enumerate(channels)) if batch else layer
    n = len(channels) if batch else None
    return lrender.render_vis(model, obj, lambda: param.image(size, batch=n, channels=image_channels),
                              thresholds=tuple(thresholds), show_image=False, progress=False, **kw)


def lucent_one_at_a_time(model: torch.nn.Module, layer: str, channels: list[int], steps: int, size: int, seed: int = 0,
                         fixed_image_size: int | None = None) -> np.ndarray:
    """Images ``[N, C, H, W]`` rendered by Lucent, one ``render_vis`` call per neuron."""
    out = []
    for ch in channels:
        imgs = _lucent_run(model, f"{layer}:{ch}", [ch], steps, size, seed, False, (steps,), fixed_image_size=fixed_image_size)
        out.append(imgs[-1][0])
    return np.stack(out).transpose(0, 3, 1, 2)


def lucent_batched(model: torch.nn.Module, layer: str, channels: list[int], steps: int, size: int, seed: int = 0,
                   fixed_image_size: int | None = None, thresholds: Optional[Sequence[int]] = None,
                   **kw: object) -> np.ndarray | list[np.ndarray]:
    """Images ``[N, C, H, W]`` rendered by Lucent in one batch with per-element channel objectives
    (a list of them, one per step of ``thresholds``, when ``thresholds`` is given)."""
    imgs = _lucent_run(model, layer, channels, steps, size, seed, True, thresholds or (steps,),
                       fixed_image_size=fixed_image_size, **kw)
    arrays = [a.transpose(0, 3, 1, 2) for a in imgs]
    return arrays if thresholds else arrays[-1]


def activations(model: torch.nn.Module, targets: list[str], images: np.ndarray | torch.Tensor, resize: int) -> torch.Tensor:
    """Objective ``i`` on image ``i`` (``[N]``), images resized to ``resize`` px as in rendering."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    x = torch.nn.functional.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    vals = objective_values(model, targets, x, batch_size=8)
    return vals.diagonal()


@dataclass
class TargetSet:
    """One benchmark problem: our model, Lucent's model, the targets and how Lucent renders them."""

    name: str
    ours: torch.nn.Module
    lucent: torch.nn.Module
    layer: str
    channels: list[int]
    size: int
    lucent_kw: dict
    resize_to: Optional[int] = None  # None: the model's input size

    @property
    def targets(self) -> list[str]:
        return [f"{self.layer}:{c}" for c in self.channels]

    @property
    def resize(self) -> int:
        return self.resize_to or input_shape(self.ours)[1]

    def settings(self, **changes: object) -> RenderSettings:
        """Our render settings for this problem (its image size and resize), with ``changes``."""
        return RenderSettings(size=self.size, resize_to=self.resize_to).replace(**changes)


def inceptionv1_set(n: int, size: int = 128, resize_to: Optional[int] = None,
                    device: "str | torch.device" = "cpu") -> TargetSet:
    """``n`` ``mixed4a`` channels of random-init InceptionV1, ``size`` px images resized to
    ``resize_to`` (default 224, as Lucent does), both models on ``device`` (Lucent renders on
    ``cuda:0`` whenever CUDA is available, so use ``"cuda:0"`` there)."""
    ours, theirs = models()
    kw = {} if resize_to is None else {"fixed_image_size": resize_to}
    return TargetSet("inceptionv1", ours.to(device), theirs.to(device), "mixed4a", list(range(n)), size, kw, resize_to)


def fashion_set(n: int) -> TargetSet:
    from lucent.optvis import transform

    from circuits import load_model

    model = load_model()
    tr = default_transforms(28)
    # Lucent's jitter(d) crops d px away (offsets 0..d-1); ours with jitter j crops j - 1 (offsets
    # 0..j-1 around the centre): jitter(j - 1) gives Lucent the same output size, so that its
    # images reach the model at their own scale too (no resampling by the final resize)
    lucent_transforms: list[Callable] = []
    if tr.pad:
        lucent_transforms.append(transform.pad(tr.pad, mode="constant", constant_value=tr.fill))
    if tr.jitter > 1:
        lucent_transforms.append(transform.jitter(tr.jitter - 1))
    if len(tr.scales) > 1:
        lucent_transforms.append(transform.random_scale(list(tr.scales)))
    if len(tr.angles) > 1:
        lucent_transforms.append(transform.random_rotate(list(tr.angles)))
    if tr.jitter2 > 1:
        lucent_transforms.append(transform.jitter(tr.jitter2 - 1))
    lucent_transforms.append(model.preprocess_input)
    kw = dict(transforms=lucent_transforms, preprocess=False, fixed_image_size=28, image_channels=1)
    return TargetSet("fashion", model, model, "mixed4a", list(range(n)), 28, kw)


def render_key(ts: TargetSet, settings: RenderSettings, **extra: object) -> str:
    """What makes two configurations the same render, as a string: the cache request of the
    first target, the speed fields (not in the cache key, but they change the time) and ``extra``."""
    speed = {f: getattr(settings, f) for f in settings.SPEED_FIELDS}
    request = cache_requests(ts.ours, ts.targets[:1], settings.replace(steps=1))[0]
    return json.dumps([request, speed, extra], sort_keys=True, default=str)


def _median(model: torch.nn.Module, targets: list[str], images: np.ndarray | torch.Tensor, resize: int) -> float:
    return statistics.median(activations(model, targets, images, resize).tolist())


def _values_line(values: torch.Tensor) -> str:
    """``values`` rounded, with how many are not positive (a neuron the image does not switch on)."""
    inactive = [i for i, v in enumerate(values.tolist()) if not v > 0]
    return (" ".join(f"{v:.3f}" for v in values.tolist())
            + f"; {len(inactive)} of {len(values)} not positive" + (f" (positions {inactive})" if inactive else ""))


def time_to_quality(ts: TargetSet, steps: int, every: int, ladder: Sequence[int], configs: dict[str, dict],
                    grid: Optional[Path] = None) -> dict:
    """Run Lucent batched for ``steps`` and each configuration of ours up the ``ladder``; print and return the times."""
    targets = ts.targets
    thresholds = sorted(set(list(range(every, steps + 1, every)) + [steps]))
    t0 = time.perf_counter()
    lucent_imgs = lucent_batched(ts.lucent, ts.layer, ts.channels, steps, ts.size, thresholds=thresholds, **ts.lucent_kw)
    t_lucent = time.perf_counter() - t0
    medians = [_median(ts.ours, targets, im, ts.resize) for im in lucent_imgs]  # type: ignore[union-attr]
    bar = medians[-1]
    reach = next(s for s, m in zip(thresholds, medians) if m >= bar)
    lucent_values = activations(ts.ours, targets, lucent_imgs[-1], ts.resize)  # type: ignore[index]
    print(f"[featurevis {ts.name}] Lucent batched at {steps} steps, per target: {_values_line(lucent_values)}", flush=True)
    t_lucent_q = t_lucent * reach / steps
    print(f"[featurevis {ts.name}] {torch.get_num_threads()} torch thread(s); Lucent batched: {steps} steps in {t_lucent:.1f} s ({t_lucent / steps * 1000:.0f} ms/step); "
          f"median objective {bar:.4f} (the bar), first reached at step {reach} -> {t_lucent_q:.1f} s", flush=True)
    out: dict = {"lucent_s": t_lucent, "lucent_to_quality_s": t_lucent_q, "bar": bar, "lucent_medians": dict(zip(thresholds, medians)),
                 "lucent_images": lucent_imgs[-1], "lucent_values": lucent_values, "ours": {}}  # type: ignore[index]
    render(ts.ours, targets[:1], steps=1, size=ts.size, progress=False)  # warm-up (allocator, FFT plans)
    seen: dict[str, str] = {}
    for name, kw in configs.items():
        settings = ts.settings(**kw)
        request = render_key(ts, settings)
        if request in seen:
            print(f"[featurevis {ts.name}] circuits {name}: the same render as {seen[request]!r}", flush=True)
            out["ours"][name] = out["ours"][seen[request]]
            continue
        seen[request] = name
        tried = []
        for s in ladder:
            t0 = time.perf_counter()
            res = render(ts.ours, targets, settings.replace(steps=int(s)), progress=False)
            dt = time.perf_counter() - t0
            med = _median(ts.ours, targets, res.images, ts.resize)
            tried.append((int(s), dt, med))
            print(f"[featurevis {ts.name}] circuits {name}: {s} steps in {dt:.1f} s ({dt / s * 1000:.0f} ms/step), "
                  f"median objective {med:.4f}{' >= bar' if med >= bar else ''}", flush=True)
            if med >= bar:
                break
        s_ok, dt_ok, med_ok = tried[-1]
        reached = med_ok >= bar
        values = activations(ts.ours, targets, res.images, ts.resize)
        print(f"[featurevis {ts.name}] circuits {name} at {s_ok} steps, per target: {_values_line(values)}", flush=True)
        entry = {"steps": s_ok, "seconds": dt_ok, "median": med_ok, "reached": reached, "tried": tried, "images": res.images,
                 "values": values}
        if reached:
            entry["report"] = report(f"featurevis time to quality, {ts.name}, {name}", "lucent batched", t_lucent_q, dt_ok,
                                     extra=f"{len(targets)} x {ts.layer}, bar {bar:.4f} (Lucent's 512-step median); "
                                           f"ours at {s_ok} steps, Lucent at {reach}")
        else:
            print(f"[featurevis {ts.name}] circuits {name}: did not reach the bar within {ladder[-1]} steps", flush=True)
        out["ours"][name] = entry
    if grid is not None:
        _save_grid(grid, ts, out)
    return out


def equal_steps(ts: TargetSet, steps: int = 512, config: str = "defaults") -> dict:
    """Lucent batched (all targets in one ``render_vis`` batch) and ours (``config`` of
    :data:`CONFIGS`), the same number of ``steps``, on the models' device; the throughput goal
    of issue 9 (on a GPU: ours at least 5x Lucent batched at B = 128).

    Both are warmed up (2 steps) first; on CUDA the clocks are read after synchronizing. Returns
    ``report``'s dict (``speedup`` = Lucent ÷ ours) with ``lucent_median`` and ``ours_median``
    (median objective of the final images, evaluated alike: ours should be at least as good) and
    ``ours_peak_mib`` (``torch.cuda.max_memory_allocated`` during our render; ``None`` on the CPU).

    Example::

        >>> out = equal_steps(inceptionv1_set(128, device="cuda:0"))   # doctest: +SKIP
        >>> out["speedup"]                                              # doctest: +SKIP
    """
    dev = next(ts.ours.parameters()).device
    lucent_dev = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if dev != lucent_dev:
        raise ValueError(f"Lucent renders on {lucent_dev} on this machine (cuda:0 whenever CUDA is available); "
                         f"the models are on {dev}: build the target set with device={str(lucent_dev)!r}")
    targets = ts.targets
    settings = ts.settings(**CONFIGS[config])
    lucent_batched(ts.lucent, ts.layer, ts.channels, 2, ts.size, **ts.lucent_kw)  # warm-up: kernels, allocator
    render(ts.ours, targets, settings.replace(steps=2), progress=False)
    synchronize(dev)
    t0 = time.perf_counter()
    lucent_imgs = lucent_batched(ts.lucent, ts.layer, ts.channels, steps, ts.size, **ts.lucent_kw)
    synchronize(dev)
    t_lucent = time.perf_counter() - t0
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    res = render(ts.ours, targets, settings.replace(steps=steps), progress=False)
    synchronize(dev)
    t_ours = time.perf_counter() - t0
    peak = peak_memory_mib(dev)
    lucent_median = _median(ts.ours, targets, lucent_imgs, ts.resize)
    ours_median = _median(ts.ours, targets, res.images, ts.resize)
    out = report(f"featurevis {ts.name}, {len(targets)} x {ts.layer}, {steps} steps", f"lucent batched (B={len(targets)})",
                 t_lucent, t_ours, extra=f"ours {config}; median objective ours {ours_median:.4f} vs Lucent {lucent_median:.4f}"
                 + (f"; ours peak GPU memory {peak:.0f} MiB" if peak is not None else ""))
    out.update(lucent_median=lucent_median, ours_median=ours_median, ours_peak_mib=peak, steps=steps,
               batch=len(targets), device=str(dev))
    return out


def layer_render_time(model: torch.nn.Module, layer: str, channels: Sequence[int], steps: int = 512,
                      size: Optional[int] = None, resize_to: Optional[int] = None) -> dict:
    """Wall time of rendering ``channels`` of ``layer`` with the library defaults in one
    :func:`render` call, on the model's device (issue 9's goal on a GPU: all 480 ``mixed3b``
    channels of InceptionV1 at 512 steps in under 20 s). Warmed up first (2 steps on a few of
    the targets); returns ``{"seconds", "neurons", "steps", "median", "peak_mib"}``.

    Example::

        >>> layer_render_time(InceptionV1().cuda(), "mixed3b", range(480))["seconds"]   # doctest: +SKIP
    """
    dev = next(model.parameters()).device
    targets = [f"{layer}:{c}" for c in channels]
    settings = RenderSettings(size=size, resize_to=resize_to)
    render(model, targets[:8], settings.replace(steps=2), progress=False)
    reset_peak_memory(dev)
    t0 = time.perf_counter()
    res = render(model, targets, settings.replace(steps=steps), progress=False)
    synchronize(dev)
    seconds = time.perf_counter() - t0
    median = float(res.objective_values.median())  # render raises on non-finite values
    return {"seconds": seconds, "neurons": len(targets), "steps": steps, "median": median, "peak_mib": peak_memory_mib(dev)}


def _save_grid(path: Path, ts: TargetSet, out: dict) -> None:
    """PNG: row 1 Lucent at 512 steps, then one row per configuration of ours (at the step count that reached the bar)."""
    from circuits.figures.raster import save_image_png

    rows = [np.asarray(out["lucent_images"], dtype=np.float32)]
    names: list[str] = []  # configurations that ran (not the same render as an earlier one)
    for k, entry in out["ours"].items():
        if all(entry is not out["ours"][j] for j in names):
            names.append(k)
    rows += [out["ours"][k]["images"].numpy() for k in names]
    n, c, h, w = rows[0].shape
    gap = max(2, h // 32)
    canvas = np.ones((c, len(rows) * (h + gap) - gap, n * (w + gap) - gap), dtype=np.float32)
    for r, imgs in enumerate(rows):
        for i in range(n):
            canvas[:, r * (h + gap):r * (h + gap) + h, i * (w + gap):i * (w + gap) + w] = imgs[i]
    save_image_png(canvas, path, scale=max(1, 128 // h))
    print(f"[featurevis {ts.name}] image grid: {path} (rows: Lucent batched 512 steps; "
          + "; ".join(f"circuits {k} at {out['ours'][k]['steps']} steps" for k in names) + ")", flush=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="inceptionv1,fashion", help="target sets: inceptionv1, fashion")
    p.add_argument("--steps", type=int, default=512, help="Lucent's steps (the quality bar is its median there)")
    p.add_argument("--every", type=int, default=32, help="Lucent's images are evaluated every this many steps")
    p.add_argument("--ladder", default="64,96,128,192,256,320,384,448,512", help="our step counts, tried in order")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations of ours: {list(CONFIGS)}")
    p.add_argument("--grid", default=None, help="folder for the PNG grids (one per set)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for both (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ladder = [int(s) for s in args.ladder.split(",") if s]
    configs = {k: CONFIGS[k] for k in args.configs.split(",") if k}
    builders = {"inceptionv1": inceptionv1_set, "fashion": fashion_set}
    results = {}
    for name in args.sets.split(","):
        ts = builders[name](args.channels)
        grid = Path(args.grid) / f"featurevis_{name}.png" if args.grid else None
        results[name] = time_to_quality(ts, args.steps, args.every, ladder, configs, grid)
    return results


if __name__ == "__main__":
    main()
