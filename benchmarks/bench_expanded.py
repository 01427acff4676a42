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
    """Captum-branch style: full-size forward, one backward per output channel from the
    centre neuron, cropped to a ``crop × crop`` window around the gradient's support; with
    ``references`` ``[R, C, H, W]``, once per reference image (frozen there), averaged.
    Layers are read through their layouts (channels-last, tokens).

    Returns ``(weights [len(channels), in, crop, crop], prefix rows [len(channels), P, in]
    or None, forward_seconds, loop_seconds)``.
    """
    inputs = [torch.zeros(1, 3, size, size)] if references is None else list(references.split(1))
    source, target = (get_layout(model, name, (3, size, size)) for name in (from_layer, to_layer))
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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = InceptionV1().eval() if args.model == "inceptionv1" else load_model(args.model)
    src, dst = args.from_layer, args.to_layer
    ref = Reference.noise(model, n=args.references)

    def ours_cold() -> torch.Tensor:
        expanded_mod._GEOMETRY_CACHE.clear()
        return expanded_weights(model, src, dst, reference=ref, batch_size=args.batch_size)

    ours = ours_cold()
    conn = connection_weights(model, src, dst, channels=[0], reference=ref)
    references = ref.images if conn.frozen else None
    print(f"{args.model} {src}→{dst}: {len(conn.frozen)} frozen ops" + (f", reference {ref}" if conn.frozen else ""))
    n_out, _, kh, _ = ours.shape
    subset = list(range(0, n_out, max(1, n_out // args.peer_channels)))[: args.peer_channels]
    peer, peer_prefix, fwd_s, loop_s = peer_loop(model, src, dst, subset, crop=kh, references=references)
    torch.testing.assert_close(ours[subset], peer, atol=1e-5 * float(peer.abs().max()), rtol=0)
    max_diff = float((ours[subset] - peer).abs().max())
    if peer_prefix is not None:  # a token layer: the class-token rows agree too
        prefix = connection_weights(model, src, dst, channels=subset, reference=ref).prefix_weights
        torch.testing.assert_close(prefix, peer_prefix, atol=1e-5 * float(peer_prefix.abs().max()), rtol=0)

    # timing: the peer's loop is extrapolated from len(subset) to n_out channels
    peer_runs = [peer_loop(model, src, dst, subset, crop=kh, references=references)[2:] for _ in range(args.repeat - 1)]
    fwd_s = min([fwd_s, *(r[0] for r in peer_runs)])
    loop_s = min([loop_s, *(r[1] for r in peer_runs)])
    peer_total = fwd_s + loop_s * n_out / len(subset)
    ours_s = timeit(ours_cold, repeat=args.repeat, warmup=0)
    warm_s = timeit(
        lambda: expanded_weights(model, src, dst, reference=ref, batch_size=args.batch_size), repeat=args.repeat, warmup=1
    )
    # CPU time of this process: robust to other processes sharing the machine
    _, _, fwd_c, loop_c = peer_loop(model, src, dst, subset, crop=kh, clock=time.process_time, references=references)
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
