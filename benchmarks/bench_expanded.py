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
"""

from __future__ import annotations

import argparse
import time

import torch

import circuits.expanded as expanded_mod
from circuits.expanded import Reference, connection_weights, expanded_weights, linearized
from circuits.layers import capture
from circuits.models import InceptionV1, load_model

from .common import machine, report, timeit


def peer_loop(
    model,
    from_layer: str,
    to_layer: str,
    channels: list[int],
    crop: int,
    size: int = 224,
    clock=time.perf_counter,
    references: torch.Tensor | None = None,
):
    """Captum-branch style: full-size forward, one backward per output channel, centre crop;
    with ``references`` ``[R, C, H, W]``, once per reference image (frozen there), averaged.

    Returns ``(weights [len(channels), in, crop, crop], forward_seconds, loop_seconds)``.
    """
    inputs = [torch.zeros(1, 3, size, size)] if references is None else list(references.split(1))
    total, fwd, loop = None, 0.0, 0.0
    for x in inputs:
        t0 = clock()
        with linearized(model, reference=None if references is None else x), capture(model, [from_layer, to_layer]) as acts:
            model(x)
            t1 = clock()
            a, out = acts[from_layer], acts[to_layer]
            cy, cx = (out.shape[-2] - 1) // 2, (out.shape[-1] - 1) // 2
            rows = []
            for c in channels:
                (g,) = torch.autograd.grad(out[:, c, cy, cx].sum(), a, retain_graph=True)
                rows.append(g[0])
        t2 = clock()
        fwd, loop = fwd + t1 - t0, loop + t2 - t1
        g = torch.stack(rows)
        total = g if total is None else total + g
    g = total / len(inputs)
    y0, x0 = (g.shape[-2] - crop) // 2, (g.shape[-1] - crop) // 2
    return g[..., y0 : y0 + crop, x0 : x0 + crop], fwd, loop


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--from-layer", default="mixed3a")
    p.add_argument("--to-layer", default="mixed3b")
    p.add_argument("--peer-channels", type=int, default=48, help="channels the peer loop is timed on")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default="inceptionv1", help="inceptionv1 or a torchvision classifier (random init)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = InceptionV1().eval() if args.model == "inceptionv1" else load_model(args.model)
    src, dst = args.from_layer, args.to_layer
    ref = Reference.noise(model)

    def ours_cold() -> torch.Tensor:
        expanded_mod._GEOMETRY_CACHE.clear()
        return expanded_weights(model, src, dst, reference=ref)

    ours = ours_cold()
    frozen = connection_weights(model, src, dst, channels=[0], reference=ref).frozen
    references = ref.images if frozen else None
    print(f"{args.model} {src}→{dst}: {len(frozen)} frozen ops" + (f", reference {ref}" if frozen else ""))
    n_out, _, kh, _ = ours.shape
    subset = list(range(0, n_out, max(1, n_out // args.peer_channels)))[: args.peer_channels]
    peer, fwd_s, loop_s = peer_loop(model, src, dst, subset, crop=kh, references=references)
    torch.testing.assert_close(ours[subset], peer, atol=1e-5 * float(peer.abs().max()), rtol=0)
    max_diff = float((ours[subset] - peer).abs().max())

    # timing: the peer's loop is extrapolated from len(subset) to n_out channels
    peer_runs = [peer_loop(model, src, dst, subset, crop=kh, references=references)[1:] for _ in range(2)]
    fwd_s = min(fwd_s, *(r[0] for r in peer_runs))
    loop_s = min(loop_s, *(r[1] for r in peer_runs))
    peer_total = fwd_s + loop_s * n_out / len(subset)
    ours_s = timeit(ours_cold, repeat=3, warmup=0)
    warm_s = timeit(lambda: expanded_weights(model, src, dst), repeat=3, warmup=1)
    # CPU time of this process: robust to other processes sharing the machine
    _, fwd_c, loop_c = peer_loop(model, src, dst, subset, crop=kh, clock=time.process_time, references=references)
    peer_cpu = fwd_c + loop_c * n_out / len(subset)
    c0 = time.process_time()
    ours_cold()
    ours_cpu = time.process_time() - c0
    print(
        f"CPU time: peer (extrapolated) {peer_cpu:.2f} s, ours cold {ours_cpu:.3f} s, "
        f"ratio x{peer_cpu / ours_cpu:.1f}"
    )
    print(f"machine: {machine()}")
    print(
        f"peer: forward {fwd_s:.3f} s + {len(subset)}-channel loop {loop_s:.3f} s, extrapolated "
        f"linearly to {n_out} channels = {peer_total:.2f} s; ours warm (geometry cached): {warm_s:.3f} s; "
        f"weights {tuple(ours.shape)}, max |ours - peer| = {max_diff:.2e} (max |w| = {float(peer.abs().max()):.2e})"
    )
    result = report(
        f"expanded weights {src}→{dst}, {n_out} channels, cropped {kh}x{kh}",
        "per-channel backward loop (captum optim branch), 224 px",
        peer_total,
        ours_s,
        extra=f"peer timed on {len(subset)} channels and extrapolated; ours cold incl. geometry search",
    )
    result.update(
        peer_cpu_s=peer_cpu, ours_cpu_s=ours_cpu, warm_s=warm_s, peer_forward_s=fwd_s,
        peer_loop_subset_s=loop_s, max_abs_diff=max_diff,
    )
    return result


if __name__ == "__main__":
    main()
