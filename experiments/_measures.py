"""Measurements behind the figures' claims, and the controls they are compared with.

Every figure states its claim as a number (:class:`Claim`) next to the same measurement on

* **random-init weights**: the same architecture re-initialised with PyTorch's default
  initialisation, seeded, several draws (:func:`random_init_copies`); where the figure's
  neurons were *chosen by a search* (the story neurons), the control runs the **same search**
  on each random draw, so that the selection's own optimism is in the control too;
* **shuffled weights** (where it applies): the trained weights with the structure the claim
  is about destroyed and everything else kept (:func:`shuffle_positions`,
  :func:`shuffle_entries`, sign flips of paths in :func:`sign_shuffled_washout`).

A claim *beats its control* when it lies beyond every control value in the claimed
direction; a figure whose claim does not says so in its caption.

The searches (:func:`best_family`, :func:`highlow_family`, :func:`boundary_neuron`,
:func:`bottleneck_neuron`) take weights, not models, where they can, so that the story
script (``story_neurons.py``) and the figures' controls run exactly the same code.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "Claim",
    "random_init_copies",
    "shuffle_positions",
    "shuffle_entries",
    "structured",
    "dihedral_cosine",
    "best_family",
    "family_stats",
    "input_kernels",
    "high_frequency_share",
    "highlow_family",
    "odd_fraction",
    "boundary_neuron",
    "bottleneck_neuron",
    "path_contributions",
    "washout",
    "sign_shuffled_washout",
    "smoothness",
    "top_share",
    "position_rank_share",
    "factor_concentration",
    "effective_classes",
]


# ----------------------------------------------------------------------------- claims


def _fmt_values(values: Sequence[float]) -> str:
    v = [float(x) for x in values]
    if not v:
        return "not run"
    if len(v) <= 3:
        return ", ".join(f"{x:.2f}" for x in v)
    return f"{min(v):.2f}–{max(v):.2f} ({len(v)} draws)"


@dataclass
class Claim:
    """A figure's claim as a number, next to its controls.

    ``higher=True``: the claim is that ``value`` is larger than on random-init/shuffled
    weights (``False``: smaller). ``beats`` is ``None`` when no control was run.
    """

    what: str
    value: float
    random_init: list[float] = field(default_factory=list)
    shuffled: list[float] = field(default_factory=list)
    higher: bool = True
    control: str = "same measurement"
    shuffle: str = ""
    shuffled_name: str = "shuffled"

    @property
    def controls(self) -> list[float]:
        return [float(x) for x in list(self.random_init) + list(self.shuffled)]

    @property
    def beats(self) -> Optional[bool]:
        c = self.controls
        if not c or not math.isfinite(self.value):
            return None
        return bool(self.value > max(c)) if self.higher else bool(self.value < min(c))

    @property
    def verdict(self) -> str:
        b = self.beats
        if b is None:
            return "no control run"
        return "beats its controls" if b else "does NOT beat its controls"

    def caption(self) -> str:
        parts = [f"random init {_fmt_values(self.random_init)}"] if self.random_init or not self.shuffled else []
        if self.shuffled:
            parts.append(f"{self.shuffled_name} {_fmt_values(self.shuffled)}")
        return f"{self.what}: {self.value:.2f} ({'; '.join(parts)}) — {self.verdict}"

    def as_dict(self) -> dict:
        return {"what": self.what, "value": float(self.value), "random_init": [float(x) for x in self.random_init],
                "shuffled": [float(x) for x in self.shuffled], "higher_is_claim": self.higher,
                "control": self.control, "shuffle": self.shuffle, "shuffled_name": self.shuffled_name,
                "beats_control": self.beats, "verdict": self.verdict}


# ----------------------------------------------------------------------------- controls


def random_init_copies(model: nn.Module, n: int, seed: int = 0) -> Iterator[nn.Module]:
    """``n`` copies of ``model`` re-initialised (every module's ``reset_parameters``, PyTorch's
    default initialisation) with seeds ``seed, seed + 1, ...``; in eval mode. The global RNG
    state is restored afterwards, so a control does not change later random numbers."""
    for i in range(int(n)):
        m = copy.deepcopy(model)
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(int(seed) + i)
            for mod in m.modules():
                reset = getattr(mod, "reset_parameters", None)
                if callable(reset):
                    reset()
        finally:
            torch.random.set_rng_state(state)
        yield m.eval()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def shuffle_positions(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[out, in, kh, kw]``: each output neuron's position vectors ``w[o, :, y, x]`` permuted
    among the positions where that neuron has weights (its support). Keeps which input
    directions a neuron uses and how strongly; destroys where it uses them."""
    g = _generator(seed)
    out = w.clone()
    flat = out.flatten(2)
    for o in range(w.shape[0]):
        support = torch.nonzero(flat[o].abs().sum(0) > 0).squeeze(1)
        if len(support) > 1:
            flat[o][:, support] = flat[o][:, support[torch.randperm(len(support), generator=g)]]
    return out


def shuffle_entries(w: torch.Tensor, seed: int = 0, per_map: bool = False) -> torch.Tensor:
    """Each output neuron's weights permuted at random over (input channel, position) within
    its spatial support (``per_map=True``: over positions, separately for every input channel).
    Keeps each neuron's weight distribution; destroys all structure."""
    g = _generator(seed)
    out = w.clone()
    flat = out.flatten(2)  # [out, in, kh*kw]
    for o in range(w.shape[0]):
        support = torch.nonzero(flat[o].abs().sum(0) > 0).squeeze(1)
        block = flat[o][:, support]
        if per_map:
            for c in range(block.shape[0]):
                block[c] = block[c][torch.randperm(block.shape[1], generator=g)]
        else:
            block = block.flatten()[torch.randperm(block.numel(), generator=g)].view_as(block)
        flat[o][:, support] = block
    return out


# ----------------------------------------------------------------------------- families


def structured(w: torch.Tensor, threshold: float = 0.05) -> torch.Tensor:
    """``[out]`` bool: neurons whose ``[in, kh*kw]`` weights are not one spatial map times one
    channel vector (energy beyond the first singular value > ``threshold``). Excludes 1x1
    neurons and pool branches, whose spatial pattern is fixed by the architecture."""
    s = torch.linalg.svdvals(w.double().flatten(2))
    rest = 1 - s[:, 0] ** 2 / (s ** 2).sum(1).clamp_min(1e-300)
    return rest > threshold


def _dihedral(w: torch.Tensor) -> torch.Tensor:
    """``[n, in, k, k]`` → ``[8, n, in, k, k]``: the 4 rotations, each with and without a flip."""
    out = []
    for r in range(4):
        x = torch.rot90(w, r, dims=(2, 3))
        out += [x, torch.flip(x, dims=(3,))]
    return torch.stack(out)


def dihedral_cosine(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best orientation-aligned cosine between neurons' weights ``[n, in, k, k]`` (square kernels).

    ``best[i, j] = max_g cos(w_i, g(w_j))`` over the 8 rotations/reflections ``g`` of the
    kernel (same input channels); ``which[i, j]`` is the ``g`` that attains it (0 = identity,
    ``2r`` = rotation by ``r * 90°``, ``2r + 1`` = that rotation then a left-right flip).
    """
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"dihedral_cosine needs square conv weights [n, in, k, k]; got {tuple(w.shape)}")
    w = w.double()
    u = w.flatten(1)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    d = _dihedral(w).flatten(2)
    d = d / d.norm(dim=2, keepdim=True).clamp_min(1e-300)
    sims = torch.einsum("ni,gmi->gnm", u, d)
    best, which = sims.max(0)
    return best, which


@dataclass
class Family:
    """A family of neurons found by :func:`best_family` (``neurons[0]`` is the seed)."""

    neurons: list[int]
    score: float  # mean pairwise best orientation-aligned cosine
    plain: float  # the same without aligning (identity only)
    transforms: list[list[int]]


def best_family(w: torch.Tensor, n: int, candidates: Optional[torch.Tensor] = None) -> Family:
    """The ``n`` neurons with the most similar weights up to rotation/reflection.

    For each candidate seed, the family is the seed and its ``n - 1`` nearest candidates by
    best orientation-aligned cosine (:func:`dihedral_cosine`); its score is the mean pairwise
    aligned cosine. Returns the highest-scoring family. ``candidates``: ``[out]`` bool mask
    (default :func:`structured`).
    """
    mask = structured(w) if candidates is None else candidates.bool()
    if int(mask.sum()) < n:
        raise ValueError(f"best_family: only {int(mask.sum())} candidate neurons for a family of {n}")
    best, which = dihedral_cosine(w)
    u = w.double().flatten(1)
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-300)
    plain = u @ u.T
    top: Optional[Family] = None
    off = ~torch.eye(n, dtype=torch.bool)
    for s in torch.nonzero(mask).squeeze(1).tolist():
        a = best[s].clone()
        a[~mask] = -math.inf
        a[s] = math.inf
        fam = a.argsort(descending=True, stable=True)[:n]
        score = float(best[fam][:, fam][off].mean())
        if top is None or score > top.score:
            top = Family(fam.tolist(), score, float(plain[fam][:, fam][off].mean()), which[fam][:, fam].tolist())
    assert top is not None
    return top


def family_stats(w: torch.Tensor, neurons: Sequence[int], k: int = 2, nmf: Optional[dict] = None) -> dict:
    """NMF of a family's weights (:func:`circuits.nmf.family_factors`): explained variance
    and the *opposition* of the first two factors' spatial loadings (mean over neurons of
    ``-corr(L0, L1)``; 1 = where one factor excites, the other inhibits, as in high-low
    frequency detectors). Returns ``{"factors", "explained", "opposition"}``."""
    from circuits.nmf import family_factors

    f = family_factors(w[list(neurons)], k, **(nmf or {}))
    opp = float("nan")
    if k >= 2 and f.loadings.ndim == 4:
        L = f.loadings.double().flatten(2)
        a, b = L[:, 0] - L[:, 0].mean(1, keepdim=True), L[:, 1] - L[:, 1].mean(1, keepdim=True)
        den = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
        opp = float((-(a * b).sum(1) / den).mean())
    return {"factors": f, "explained": float(f.explained), "opposition": opp}


def input_kernels(model: nn.Module, layer: str, size: Optional[int] = None, batch: int = 32) -> torch.Tensor:
    """``[C, H, W]``: the linearised pixel-space kernel of each channel of ``layer`` (gradient of
    its centre activation w.r.t. the input image, with ReLU → identity and max → average pool,
    summed over input colour channels). What each channel responds to, linearly. ``size``: side
    of the input (default the model's; it must hold the receptive field), ``batch`` channels per
    backward pass."""
    from circuits.expanded import linearized
    from circuits.layers import centre, run_until
    from circuits.models import device_and_dtype, input_shape

    device, dtype = device_and_dtype(model)
    c, h, wd = input_shape(model)
    if size is not None:
        h = wd = int(size)
    with torch.no_grad(), linearized(model):
        n = run_until(model, torch.zeros((1, c, h, wd), dtype=dtype, device=device), [layer])[layer].shape[1]
    out_k = []
    for lo in range(0, n, batch):
        chans = torch.arange(lo, min(n, lo + batch))
        x = torch.zeros((len(chans), c, h, wd), dtype=dtype, device=device, requires_grad=True)
        with torch.enable_grad(), linearized(model):
            out = run_until(model, x, [layer])[layer]
            y0, x0 = centre(out.shape[2], out.shape[3])
            sel = out[torch.arange(len(chans)), chans.to(out.device), y0, x0].sum()
            (g,) = torch.autograd.grad(sel, x)
        out_k.append(g.detach().sum(1).cpu())
    return torch.cat(out_k)


def high_frequency_share(kernel: np.ndarray, cutoff: float = 0.25) -> float:
    """Share of a 2-d kernel's power (mean removed) above ``cutoff`` cycles per pixel."""
    k = np.asarray(kernel, dtype=np.float64)
    k = k - k.mean()
    p = np.abs(np.fft.fft2(k)) ** 2
    r = np.sqrt(np.fft.fftfreq(k.shape[0])[:, None] ** 2 + np.fft.fftfreq(k.shape[1])[None, :] ** 2)
    total = p.sum()
    return float(p[r > cutoff].sum() / total) if total > 0 else 0.0


def highlow_family(w: torch.Tensor, kernels: torch.Tensor, n: int = 8, k: int = 2, nmf: Optional[dict] = None,
                   candidates: Optional[torch.Tensor] = None) -> dict:
    """A family whose weights two factors explain, and whose two factors differ in frequency.

    Candidates: for every structured seed neuron, the seed and its ``n - 1`` nearest
    structured neurons by orientation-aligned cosine. Each is factored into ``k`` NMF
    directions over the input layer (:func:`family_stats`); a direction's frequency preference
    is :func:`high_frequency_share` of its linearised pixel kernel (``kernels [in, H, W]`` from
    :func:`input_kernels`). Score = explained variance × |difference in high-frequency share of
    the two factors|. Returns the best candidate's numbers (``neurons``, ``explained``,
    ``opposition``, ``hf`` per factor, ``frequency_contrast``, ``score``).
    """
    mask = structured(w) if candidates is None else candidates.bool()
    best, _ = dihedral_cosine(w)
    K = kernels.double().flatten(1)  # [in, H*W]
    shape = kernels.shape[1:]
    top: Optional[dict] = None
    for s in torch.nonzero(mask).squeeze(1).tolist():
        a = best[s].clone()
        a[~mask] = -math.inf
        a[s] = math.inf
        fam = a.argsort(descending=True, stable=True)[:n].tolist()
        st = family_stats(w, fam, k, nmf)
        d = st["factors"].directions.double()
        hf = [high_frequency_share((d[i] @ K).reshape(shape).numpy()) for i in range(min(2, k))]
        contrast = abs(hf[0] - hf[1]) if len(hf) == 2 else 0.0
        score = st["explained"] * contrast
        if top is None or score > top["score"]:
            top = {"neurons": fam, "seed": s, "explained": st["explained"], "opposition": st["opposition"], "hf": hf,
                   "frequency_contrast": contrast, "score": score}
    if top is None:
        raise ValueError("highlow_family: no structured candidate neurons")
    return top


# ----------------------------------------------------------------------------- boundary & bottleneck


def odd_fraction(w: torch.Tensor) -> torch.Tensor:
    """``[out]``: share of each neuron's weight energy ``[in, kh, kw]`` in the part that is odd
    under a 180° rotation, ``(W - rot180 W) / 2``. A map that excites on one side and inhibits
    on the opposite side is odd (1); a centred blob is even (0); i.i.d. noise gives about
    ``(kh*kw - 1) / (2*kh*kw)``."""
    w = w.double()
    odd = (w - torch.rot90(w, 2, dims=(-2, -1))) / 2
    return (odd.square().sum((1, 2, 3)) / w.square().sum((1, 2, 3)).clamp_min(1e-300)).float()


def boundary_neuron(w: torch.Tensor, candidates: Optional[torch.Tensor] = None) -> tuple[int, float]:
    """The structured neuron with the largest :func:`odd_fraction` (strong excitation and
    inhibition from the same input neurons at opposite sides): ``(index, odd fraction)``."""
    mask = structured(w) if candidates is None else candidates.bool()
    of = odd_fraction(w)
    of = torch.where(mask, of, torch.full_like(of, -1.0))
    i = int(of.argmax())
    return i, float(of[i])


def bottleneck_neuron(w: torch.Tensor, candidates: torch.Tensor) -> tuple[int, float]:
    """Among ``candidates`` (``[out]`` bool: neurons whose connection runs through a
    bottleneck), the one with the strongest weights ``w [out, in, kh, kw]`` (two layers back),
    and its strength relative to the median neuron of the layer: ``(index, ratio)``."""
    norms = w.double().flatten(1).norm(dim=1)
    med = float(norms.median())
    masked = torch.where(candidates.bool(), norms, torch.full_like(norms, -1.0))
    i = int(masked.argmax())
    return i, float(norms[i] / med) if med > 0 else float("inf")


# ----------------------------------------------------------------------------- paths & washout


def path_contributions(model: nn.Module, src: str, mid: str, dst: str, dst_ch: int, mids: Optional[Sequence[int]] = None,
                       size: Optional[int] = None, batch: int = 64) -> torch.Tensor:
    """``[len(mids), C_src, H, W]``: the linearised contribution of ``src`` to ``dst[dst_ch]``
    (at the centre) through each middle channel ``m`` of ``mid`` (default: **all** of them).

    Computed by gradients on the linearised model with ``mid``'s activation masked to channel
    ``m`` (one batch element per path, ``batch`` paths per backward pass). The map is linear
    in ``mid``'s activation, so with all middle channels the paths sum to the full linearised
    gradient — the expanded weights — up to float rounding. ``size``: side of the input (default
    the model's).
    """
    from circuits.expanded import linearized
    from circuits.layers import centre, replace_activation, run_until
    from circuits.models import device_and_dtype, input_shape

    device, dtype = device_and_dtype(model)
    c, h, wd = input_shape(model)
    if size is not None:
        h = wd = int(size)
    x = torch.zeros((1, c, h, wd), dtype=dtype, device=device)
    if mids is None:
        with torch.no_grad(), linearized(model):
            mids = list(range(run_until(model, x, [mid])[mid].shape[1]))
    mids = [int(m) for m in mids]
    chunks = []
    for i in range(0, len(mids), batch):
        part = mids[i: i + batch]
        n = len(part)
        store: dict = {}

        def free(out: torch.Tensor) -> torch.Tensor:
            t = out.new_zeros((n, *out.shape[1:])).requires_grad_(True)
            store["free"] = t
            return t

        def mask(out: torch.Tensor) -> torch.Tensor:
            m = out.new_zeros((n, out.shape[1], 1, 1))
            m[torch.arange(n), torch.tensor(part)] = 1.0
            return out * m

        with torch.enable_grad(), linearized(model), replace_activation(model, src, free), replace_activation(model, mid, mask):
            out = run_until(model, x, [dst])[dst]
            sel = out[(slice(None), dst_ch, *centre(out.shape[2], out.shape[3]))].sum()
            (g,) = torch.autograd.grad(sel, store["free"])
        chunks.append(g.detach().cpu())
    return torch.cat(chunks, 0)


def washout(paths: np.ndarray) -> float:
    """``1 - ||Σ_m P_m|| / Σ_m ||P_m||`` for paths ``[m, ...]``: 0 = the paths add up, 1 = they
    cancel completely."""
    p = np.asarray(paths, dtype=np.float64).reshape(len(paths), -1)
    parts = np.sqrt((p ** 2).sum(1)).sum()
    return float(1.0 - np.sqrt((p.sum(0) ** 2).sum()) / parts) if parts > 0 else 0.0


def sign_shuffled_washout(paths: np.ndarray, draws: int = 100, seed: int = 0) -> np.ndarray:
    """Washout of ``Σ_m s_m P_m`` with random signs ``s_m = ±1`` (``draws`` values): how much
    paths of these sizes cancel when their signs carry no structure."""
    rng = np.random.default_rng(seed)
    p = np.asarray(paths, dtype=np.float64)
    return np.array([washout(p * rng.choice([-1.0, 1.0], size=len(p)).reshape(-1, *([1] * (p.ndim - 1)))) for _ in range(draws)])


# ----------------------------------------------------------------------------- other measures


def smoothness(m: np.ndarray) -> float:
    """Lag-1 spatial autocorrelation of a 2-d map (horizontal and vertical neighbours pooled,
    mean removed): 1 = smooth, about 0 = noise."""
    c = np.asarray(m, dtype=np.float64)
    c = c - c.mean()
    den = float((c ** 2).mean())
    if den == 0:
        return 0.0
    num = np.concatenate([(c[:, :-1] * c[:, 1:]).ravel(), (c[:-1] * c[1:]).ravel()]).mean()
    return float(num / den)


def top_share(w: np.ndarray, k: int) -> float:
    """Share of a neuron's squared weights ``[in, kh, kw]`` carried by its ``k`` strongest inputs."""
    e = (np.asarray(w, dtype=np.float64).reshape(len(w), -1) ** 2).sum(1)
    tot = e.sum()
    return float(np.sort(e)[::-1][:k].sum() / tot) if tot > 0 else 0.0


def position_rank_share(w: np.ndarray, k: int = 2) -> float:
    """Share of the energy of a neuron's ``[positions, in]`` weight matrix (positions in its
    support) in its ``k`` largest singular values: how few directions describe what the
    weights look for at all positions."""
    a = np.asarray(w, dtype=np.float64)
    m = a.reshape(a.shape[0], -1).T
    m = m[np.abs(m).sum(1) > 0]
    if len(m) == 0:
        return 0.0
    s = np.linalg.svd(m, compute_uv=False) ** 2
    return float(s[:k].sum() / s.sum()) if s.sum() > 0 else 0.0


def factor_concentration(direction: np.ndarray, k: int) -> float:
    """Share of a non-negative direction's squared mass on its ``k`` largest entries."""
    d = np.asarray(direction, dtype=np.float64) ** 2
    return float(np.sort(d)[::-1][:k].sum() / d.sum()) if d.sum() > 0 else 0.0


def effective_classes(acts: torch.Tensor, labels: torch.Tensor, k: int = 100, n_classes: Optional[int] = None) -> np.ndarray:
    """``[neurons]``: how many classes each neuron responds to — ``exp(entropy)`` of the class
    histogram of its ``k`` most activating images (``acts [images, neurons]``, e.g. the max over
    positions). 1 = all top images of one class; ``n_classes`` = evenly spread. ``nan`` for a
    neuron that is zero on its ``k``-th best image (dead)."""
    a = acts.double()
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    k = min(k, a.shape[0])
    vals, idx = a.topk(k, dim=0)  # [k, neurons]
    out = np.full(a.shape[1], np.nan)
    lab = labels[idx]  # [k, neurons]
    for j in range(a.shape[1]):
        if float(vals[-1, j]) <= 0:
            continue
        p = np.bincount(lab[:, j].numpy(), minlength=n_classes) / k
        p = p[p > 0]
        out[j] = float(np.exp(-(p * np.log(p)).sum()))
    return out
