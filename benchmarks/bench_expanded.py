"""Expanded weights ``mixed3a → mixed3b`` on InceptionV1 (random init), all 480 output channels.

Peer: the approach of Captum's unreleased ``optim`` branch (``extract_expanded_weights``):
run the (linearised) model on a full-size 224×224 input, then one backward pass per output
channel from its centre neuron to the whole ``mixed3a`` map, stack, centre-crop to the
footprint. Written here from that description (no Captum code is imported; the branch was
never released). The per-channel loop is timed on a subset of channels and extrapolated
linearly to all 480 (the forward pass is timed separately and counted once).

Ours: :func:`circuits.expanded.expanded_weights` — batched (one copy of the free tensor per
output channel, one backward), smallest input size that reproduces the 224 px result,
cropped. Timed *cold*: the geometry search (probes at several input sizes) is included on
every run; the warm time (geometry cached) is printed as well.

Both give the same numbers (asserted on the timed subset).

``--model NAME`` (a torchvision classifier, random init, e.g. ``efficientnet_b0`` with
``--from-layer features.4.0 --to-layer features.4.1``) measures a path with frozen ops
(squeeze-excitation gates, layer norms): both sides freeze at the same default reference
(:meth:`circuits.expanded.Reference.noise`, 4 smooth noise images at 224 px) and average
over its images; the peer runs its loop once per reference image inside
``linearized(model, reference=image)``.

Any layout: both sides read the layers through :func:`circuits.layouts.get_layout`, so token
models work too, e.g. ``--model vit_b_16 --from-layer encoder.layers.encoder_layer_5
--to-layer encoder.layers.encoder_layer_6 --references 1 --batch-size 64 --repeat 1``
(layer norms and attention frozen; the weights are on the 14×14 patch grid, all of it).
The peer reads the centre patch (:func:`circuits.layers.centre`) and crops its gradient to
a ``crop``-sized window around the support; its class-token rows are compared as well.
"""

from __future__ import annotations

import argparse
import time

import torch

import circuits.expanded as expanded_mod
from circuits.expanded import Reference, connection_weights, expanded_weights, linearized
from circuits.layers import capture, centre
from circuits.layouts import get_layout
from circuits.models import InceptionV1, input_shape, load_model

from .common import machine, report, synchronize, timeit


def peer_loop(
    model,
    from_layer: str,
    to_layer: str,
    channels: list[int],
    crop: int,
    size: int | None = None,
    clock=time.perf_counter,
    references: torch.Tensor | None = None,
):
    """Captum-branch style: full-size forward, one backward per output channel from the
    centre neuron, cropped to a ``crop × crop`` window around the gradient's support; with
    ``references`` ``[R, C, H, W]``, once per reference image (frozen there), averaged.
    Layers are read through their layouts (channels-last, tokens).

    Returns ``(weights [len(channels), in, crop, crop], prefix rows [len(channels), P, in]
    or None, forward_seconds, loop_seconds)``.
    """
    c, h, w = input_shape(model)
    if size is not None:
        h = w = size
    dev = next(model.parameters()).device
    inputs = [torch.zeros(1, c, h, w, device=dev)] if references is None else list(references.to(dev).split(1))
    source, target = (get_layout(model, name, (c, h, w)) for name in (from_layer, to_layer))
    total, fwd, loop = None, 0.0, 0.0
    for x in inputs:
        t0 = clock()
        with linearized(model, reference=None if references is None else x), capture(model, [from_layer, to_layer]) as acts:
            model(x)
            t1 = clock()
            a, out = acts[from_layer], target.canonical(acts[to_layer])
            cy, cx = centre(*out.shape[-2:])
            rows = []
            for c in channels:
                (g,) = torch.autograd.grad(out[:, c, cy, cx].sum(), a, retain_graph=True)
                rows.append(g[0])
        t2 = clock()
        fwd, loop = fwd + t1 - t0, loop + t2 - t1
        g = torch.stack(rows)
        total = g if total is None else total + g
    g = total / len(inputs)  # [n, *from_layer's shape]
    prefix = source.prefix(g) if source.n_prefix else None
    g = source.canonical(g)
    mask = g.abs().amax((0, 1)) > 0
    ys, xs = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    y0 = min(max((int(ys[0]) + int(ys[-1]) + 1 - crop) // 2, 0), g.shape[-2] - crop)
    x0 = min(max((int(xs[0]) + int(xs[-1]) + 1 - crop) // 2, 0), g.shape[-1] - crop)
    return g[..., y0 : y0 + crop, x0 : x0 + crop], prefix, fwd, loop


def run(
    model: "str | torch.nn.Module" = "inceptionv1",
    from_layer: str = "mixed3a",
    to_layer: str = "mixed3b",
    *,
    peer_channels: int = 48,
    references: int = 4,
    batch_size: int | None = None,
    repeat: int = 3,
    device: "str | torch.device" = "cpu",
    verbose: bool = True,
) -> dict:
    """Time ours (cold: geometry search included) against the per-channel loop, extrapolated
    from ``peer_channels`` channels to all of ``to_layer``'s; assert both give the same weights.

    ``model``: ``"inceptionv1"`` (random init, seed 0), another name :func:`circuits.models.load_model`
    knows, or a module. On a CUDA ``device`` every timing synchronizes first and last.
    Returns :func:`benchmarks.common.report`'s dict (``speedup`` = peer ÷ ours, wall clock)
    with the CPU-time ratio's parts, the warm time and the largest difference.

    Example::

        >>> out = run(device="cuda")              # doctest: +SKIP
        >>> out["speedup"], out["max_abs_diff"]   # doctest: +SKIP
    """
    dev = torch.device(device)
    if isinstance(model, str):
        torch.manual_seed(0)
        name = model
        model = InceptionV1().eval() if name == "inceptionv1" else load_model(name)
    else:
        name = type(model).__name__
    model = model.to(dev).eval()
    src, dst = from_layer, to_layer
    ref = Reference.noise(model, n=references)

    def ours_cold() -> torch.Tensor:
        expanded_mod._GEOMETRY_CACHE.clear()
        return expanded_weights(model, src, dst, reference=ref, batch_size=batch_size)

    ours = ours_cold()
    conn = connection_weights(model, src, dst, channels=[0], reference=ref)
    ref_images = ref.images.to(dev) if conn.frozen else None
    if verbose:
        print(f"{name} {src}→{dst} on {dev}: {len(conn.frozen)} frozen ops" + (f", reference {ref}" if conn.frozen else ""))
    n_out, _, kh, _ = ours.shape
    subset = list(range(0, n_out, max(1, n_out // peer_channels)))[:peer_channels]
    clock = _synchronized(time.perf_counter, dev)
    peer, peer_prefix, fwd_s, loop_s = peer_loop(model, src, dst, subset, crop=kh, clock=clock, references=ref_images)
    torch.testing.assert_close(ours[subset], peer, atol=1e-5 * float(peer.abs().max()), rtol=0)
    max_diff = float((ours[subset] - peer).abs().max())
    if peer_prefix is not None:  # a token layer: the class-token rows agree too
        prefix = connection_weights(model, src, dst, channels=subset, reference=ref).prefix_weights
        torch.testing.assert_close(prefix, peer_prefix, atol=1e-5 * float(peer_prefix.abs().max()), rtol=0)

    # timing: the peer's loop is extrapolated from len(subset) to n_out channels
    peer_runs = [peer_loop(model, src, dst, subset, crop=kh, clock=clock, references=ref_images)[2:]
                 for _ in range(repeat - 1)]
    fwd_s = min([fwd_s, *(r[0] for r in peer_runs)])
    loop_s = min([loop_s, *(r[1] for r in peer_runs)])
    peer_total = fwd_s + loop_s * n_out / len(subset)
    ours_s = timeit(ours_cold, repeat=repeat, warmup=0)
    warm_s = timeit(lambda: expanded_weights(model, src, dst, reference=ref, batch_size=batch_size), repeat=repeat, warmup=1)
    # CPU time of this process: robust to other processes sharing the machine
    _, _, fwd_c, loop_c = peer_loop(model, src, dst, subset, crop=kh, clock=_synchronized(time.process_time, dev),
                                    references=ref_images)
    peer_cpu = fwd_c + loop_c * n_out / len(subset)
    synchronize(dev)
    c0 = time.process_time()
    ours_cold()
    synchronize(dev)
    ours_cpu = time.process_time() - c0
    if verbose:
        print(f"CPU time: peer (extrapolated) {peer_cpu:.2f} s, ours cold {ours_cpu:.3f} s, ratio x{peer_cpu / ours_cpu:.1f}")
        print(f"machine: {machine()}")
        print(
            f"peer: forward {fwd_s:.3f} s + {len(subset)}-channel loop {loop_s:.3f} s, extrapolated "
            f"linearly to {n_out} channels = {peer_total:.2f} s; ours warm (geometry cached): {warm_s:.3f} s; "
            f"weights {tuple(ours.shape)}, max |ours - peer| = {max_diff:.2e} (max |w| = {float(peer.abs().max()):.2e})"
        )
    result = report(
        f"expanded weights {src}→{dst}, {n_out} channels, cropped {kh}x{kh}",
        "per-channel backward loop (captum optim branch), full-size input",
        peer_total,
        ours_s,
        extra=f"peer timed on {len(subset)} channels and extrapolated; ours cold incl. geometry search",
    )
    result.update(
        peer_cpu_s=peer_cpu, ours_cpu_s=ours_cpu, warm_s=warm_s, peer_forward_s=fwd_s,
        peer_loop_subset_s=loop_s, max_abs_diff=max_diff, channels=n_out, peer_channels=len(subset), device=str(dev),
    )
    return result


def _synchronized(clock, device: torch.device):
    """``clock`` that first waits for the GPU's queued work (so that a reading covers it)."""
    if device.type != "cuda":
        return clock

    def read() -> float:
        synchronize(device)
        return clock()

    return read


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--from-layer", default="mixed3a")
    p.add_argument("--to-layer", default="mixed3b")
    p.add_argument("--peer-channels", type=int, default=48, help="channels the peer loop is timed on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="inceptionv1", help="inceptionv1 or a torchvision classifier (random init)")
    p.add_argument("--references", type=int, default=4, help="smooth-noise reference images (frozen paths)")
    p.add_argument("--batch-size", type=int, default=None, help="output channels per backward pass (ours)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each side")
    p.add_argument("--device", default="cpu", help="where both run (e.g. cuda)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args.model, args.from_layer, args.to_layer, peer_channels=args.peer_channels, references=args.references,
               batch_size=args.batch_size, repeat=args.repeat, device=args.device)


if __name__ == "__main__":
    main()
