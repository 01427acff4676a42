"""Build and execute the notebooks under ``notebooks/``, committed with their outputs.

One walkthrough per audience, each a list of cells written here (so a notebook is reviewed
as code), executed with nbclient on the venv's ``python3`` kernel; the executed notebook
(outputs included, PNG figures at 72 dpi) replaces the committed one atomically:

- ``walkthrough`` — the article's claims on the bundled model, each against a control;
- ``own_model`` — your own torchvision model (ResNet-18, random init): layer names, NMF,
  expanded weights across a block, a short render, a figure; results shown by their HTML reprs;
- ``inspect_checkpoint`` — weight inspection of a checkpoint file: statistics, dead units and
  sparsity, histograms, a diff against a perturbed copy, and one neuron's card.

    python experiments/make_notebook.py                               # all three
    python experiments/make_notebook.py --notebook own_model          # one
    python experiments/make_notebook.py --notebook walkthrough --steps 2 --out /tmp/walkthrough.ipynb   # quick check

``CIRCUITS_NOTEBOOK_STEPS`` sets the feature-visualization budget inside a notebook
(``--steps`` sets it; default 256 for the walkthrough, 32 for the others);
``tests/test_notebook.py`` runs the same cells with 2 steps.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"

CELLS: list[tuple[str, str]] = [
    ("markdown", """# Walkthrough: reading the weights of a trained model, with controls

This notebook follows the Distill article *Visualizing Weights* (Voss et al., 2021) on the
project's own trained model, `fashion-inception` — a small InceptionV1-style network for
Fashion-MNIST with Lucid's layer names (`conv2d0 … conv2d2`, `mixed3a`, `mixed3b`, `mixed4a`).

The article makes claims about what weights show: late layers are banded, a few inputs carry
a neuron, two factors explain a family of neurons, expanded weights across a bottleneck show
a simpler structure, paths to a boundary detector cancel. On a different model each claim
can hold or not, so every claim here is a **number next to a control**: the same measurement
on the same architecture with random (untrained) weights. The neurons are not picked by hand:
they come from `configs/story_neurons_fashion.json`, written by `experiments/story_neurons.py`
with the measurements that chose them.

*Regenerate:* `python experiments/make_notebook.py` (executes every cell; feature
visualizations are cached on disk)."""),
    ("code", """%matplotlib inline
import json, os, sys, warnings
from pathlib import Path
warnings.filterwarnings("ignore", message="IProgress not found")

import numpy as np
import torch
import matplotlib
import matplotlib.pyplot as plt

import circuits
from circuits.expanded import connection_weights, expanded_weights
from circuits.featurevis import variable_names
from circuits.figures import factor_ordered_multiples, nmf_rgb_figure, small_multiples
from circuits.nmf import banding_score, factors_rgb, neuron_factors

ROOT = Path(circuits.__file__).resolve().parent.parent          # a source checkout: configs/ and experiments/
sys.path.insert(0, str(ROOT / "experiments"))
import _measures as M                                              # the measurements the figures use
from bottleneck_skipping import block_shares, polysemanticity

STEPS = int(os.environ.get("CIRCUITS_NOTEBOOK_STEPS", "256"))     # feature-visualization budget
plt.rcParams["figure.dpi"] = 72
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))

model = circuits.load_model()
randoms = list(M.random_init_copies(model, 2, seed=0))             # the controls: same architecture, random init
story = json.loads((ROOT / "configs" / "story_neurons_fashion.json").read_text())
claims = []                                                        # (claim, trained, random init) for the summary

def claim(what, trained, random_init=(), higher=True, shuffled=(), shuffled_name="shuffled"):
    c = M.Claim(what, float(trained), [float(x) for x in random_init], [float(x) for x in shuffled], higher=higher,
                shuffled_name=shuffled_name)
    claims.append(c)
    print(c.caption())

print("render steps:", STEPS)
print("model:", type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
print("story file measured on this model:", story["model"]["state_dict_hash"] == __import__("circuits._io", fromlist=["x"]).state_dict_hash(model))"""),
    ("markdown", """## 1. One simple trick: NMF of a neuron's weights

A neuron's input weights `[in, kh, kw]` cannot be drawn when `in` is large. One-sided NMF
(split by sign, spatial positions as samples) reduces the input channels to 3 factors, drawn
as R, G, B. The article's first observation with it: in models with **global average
pooling**, the last layers' weights are **horizontal bands**. Our model pools globally after
`mixed4a`, so we measure banding (`(Vy - Vx) / V` of the NMF maps: 1 = horizontal bands,
0 = none) in its last 5x5 conv, `mixed4a_5x5`, for every neuron, trained and random."""),
    ("code", """def mixed4a_5x5(m):
    return circuits.get_layer(m, "mixed4a_5x5_pre_relu_conv").weight.detach()

f = neuron_factors(mixed4a_5x5(model), 3)
band = banding_score(f).numpy()
claim("mean banding score of mixed4a_5x5 (all 32 neurons)", band.mean(),
      [banding_score(neuron_factors(mixed4a_5x5(m), 3)).mean() for m in randoms])
shown = np.argsort(-band)[:8]
fig = nmf_rgb_figure(factors_rgb(f.spatial[shown], scale=8), labels=[f"mixed4a_5x5:{n}\\nband {band[n]:.2f}" for n in shown],
                     title="the 8 most banded mixed4a_5x5 neurons (NMF factors as RGB)")
fig.figure"""),
    ("markdown", """The bands are there, and random weights have none: the banding is learned, as the
article says, and the NMF picture makes it visible at a glance. (The early layer `mixed3a_5x5`
is the contrast in `docs/gallery/fig02_banding.png`.)

## 2. Which neurons? The story file

The article's neurons (`mixed3b:208`, `mixed3b:345`...) do not exist here. Instead a search
picks, by the measurement each part of the story needs, a **family** with similar weights up
to rotation/reflection, a **high-low-like** family whose weights two factors explain, a
**boundary-like** neuron (excitation and inhibition from the same inputs at opposite sides),
and a neuron with strong paths **through a bottleneck**. Each choice is stored with the same
search run on random-init models — a search always finds *something*, so the control must
search too."""),
    ("code", """for name, entry in story["neurons"].items():
    cl = entry.get("claim") or entry["claims"]["explained"]
    target = entry.get("target")
    members = " ".join(map(str, entry.get("neurons", [])))
    print(f"{name:10s} {target:12s} {members:28s} {cl['what'][:60]:60s} {cl['value']:.2f}  random init {', '.join(f'{x:.2f}' for x in cl['random_init'])}  → {cl['verdict']}")
hl = story["neurons"]["highlow"]["claims"]["contrast"]
print(f"\\nhigh-low contrast of the highlow family's two factors: {hl['value']:.2f} (random init {', '.join(f'{x:.2f}' for x in hl['random_init'])}) → {hl['verdict']}")"""),
    ("markdown", """Three of the four searches find something random weights do not have. The fourth is a
partial result worth stating: two factors do explain the `mixed3a` family's `conv2d2` weights
better than in random models, and one factor prefers low frequencies, the other high ones —
but random models' factor pairs differ in frequency at least as much, so "high-low frequency
detectors" is **not** established for this model by the weights alone.

## 3. Variable names and small multiples: the bottleneck neuron

`mixed3b`'s 3x3 and 5x5 branches see `mixed3a` only through 1x1 bottlenecks. The *expanded
weights* skip them: the linearised gradient of the neuron (at the centre) with respect to
every `mixed3a` position. We look at the story's bottleneck neuron, its five strongest
`mixed3a` inputs, and their variable names (feature visualizations)."""),
    ("code", """layer, ch = story["neurons"]["bottleneck"]["target"].split(":"); ch = int(ch)
conn = connection_weights(model, "mixed3a", layer, [ch])
w = conn.weights[0]
print(f"{layer}:{ch}: {conn.kind} weights from mixed3a, shape {tuple(w.shape)}")
claim(f"share of {layer}:{ch}'s squared weights in its top 5 mixed3a inputs", M.top_share(w.numpy(), 5),
      [M.top_share(connection_weights(m, "mixed3a", layer, [ch]).weights[0].numpy(), 5) for m in randoms])
top5 = w.flatten(1).norm(dim=1).argsort(descending=True)[:5].tolist()
names = variable_names(model, [f"mixed3a:{c}" for c in top5] + [f"{layer}:{ch}"], steps=STEPS, progress=False, cache=True)
images = [names.get(f"mixed3a:{c}") for c in range(w.shape[0])]
nz = np.argwhere(w.abs().sum(0).numpy() > 0); (y0, x0), (y1, x1) = nz.min(0), nz.max(0) + 1   # the kernel's support
sm = small_multiples(w[:, y0:y1, x0:x1], images, top_n=5, labels=[f"mixed3a:{c}" for c in range(w.shape[0])], cols=5,
                     title=f"{layer}:{ch} ← its 5 strongest mixed3a inputs (expanded weights; red excites, blue inhibits)")
sm.figure"""),
    ("markdown", """A quarter or less of the weight sits in the top five inputs, but clearly more than in a
random network: the neuron listens to a few inputs more than chance would give, and the
rest is the long tail the article warns about ("How much of the story is really hiding in
these small weights?").

## 4. Two layers back: expanded weights and their factors

Expanding further back, to `conv2d2` (through the whole `mixed3a` block and the `mixed3b`
bottleneck), the article finds a simpler aggregate structure, which NMF sorts into two
factors (its figure 10)."""),
    ("code", """E2 = expanded_weights(model, "conv2d2", layer, [ch])[0]
f2 = neuron_factors(E2, 2)
claim(f"variance of {layer}:{ch}'s conv2d2 expanded weights explained by 2 factors", f2.explained[0],
      [neuron_factors(expanded_weights(m, "conv2d2", layer, [ch])[0], 2).explained[0] for m in randoms])
top12 = E2.flatten(1).norm(dim=1).argsort(descending=True)[:12].tolist()
names2 = variable_names(model, [f"conv2d2:{c}" for c in top12], steps=STEPS, progress=False, cache=True)
fo = factor_ordered_multiples(E2, f2.loadings[0], [names2.get(f"conv2d2:{c}") for c in range(E2.shape[0])], top_n=12,
                              spatial_maps=f2.spatial[0], labels=[f"conv2d2:{c}" for c in range(E2.shape[0])], cols=6,
                              title=f"{layer}:{ch} ← top 12 conv2d2 inputs (9x9 expanded weights), grouped by NMF factor")
fo.figure"""),
    ("markdown", """Two factors explain more of the trained expanded weights than of random ones, and the
maps are smooth blobs rather than noise (figure 13 of the gallery measures that smoothness:
random-init expanded weights are not smooth at all).

## 5. A boundary-like neuron, and why expanded weights can mislead

A boundary detector is excited by some input on one side and inhibited by the *same* input
on the other: its weight maps are odd under a 180° rotation. Two layers back, the article
says, excitation and inhibition through different middle neurons cancel in the expanded
weights ("washout"). We split the expanded weight from the strongest `conv2d2` source into
its 112 paths, one through each `mixed3a` channel, and compare the cancellation with paths of
the same sizes but random signs."""),
    ("code", """bd = story["neurons"]["boundary"]
blayer, bch = bd["target"].split(":"); bch = int(bch)
slayer, sch = bd["source"].split(":"); sch = int(sch)
Wb = connection_weights(model, "mixed3a", blayer, [bch]).weights
claim(f"odd share of {bd['target']}'s mixed3a weights (random init: the same search)", M.odd_fraction(Wb)[0], bd["claim"]["random_init"])
P = M.path_contributions(model, slayer, "mixed3a", blayer, bch)[:, sch]   # [112 paths, H, W]
E = expanded_weights(model, slayer, blayer, [bch])[0, sch]
kh, kw = E.shape
nz = np.argwhere(P.abs().sum(0).numpy() > 0); y0, x0 = nz.min(0)
P = P[:, y0:y0 + kh, x0:x0 + kw].numpy()
print("paths sum to the expanded weights:", np.allclose(P.sum(0), E.numpy(), atol=1e-5))
wo, shuffled = M.washout(P), M.sign_shuffled_washout(P, 200)
claim(f"washout of {bd['source']} → {bd['target']} over all {len(P)} paths", wo, shuffled=shuffled, shuffled_name="random signs")
order = np.argsort(-np.sqrt((P ** 2).sum((1, 2))))[:4]
lim = np.abs(np.concatenate([P[order], P.sum(0)[None]])).max()
fig, axes = plt.subplots(1, 5, figsize=(7.5, 1.9))
for ax, (img, title) in zip(axes, [(P[m], f"via mixed3a:{m}") for m in order] + [(P.sum(0), "Σ all 112 paths")]):
    ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim); ax.set_title(title, fontsize=8); ax.axis("off")
plt.show()"""),
    ("markdown", """The paths do cancel — most of their total size is lost in the sum — but no more than
112 paths of the same sizes with **random** signs would. In this model the washout is the
generic arithmetic of adding many paths, not a boundary-specific cancellation of excitation
and inhibition; the article's point (look at paths or per-example gradients when nonlinear
structure matters) still stands, but this figure does not demonstrate it here.

## 6. Skipping the bottleneck: where does the connection go, and are bottlenecks polysemantic?

The expanded weights from a block's input to the block split exactly by branch (the block's
channels are the concatenation of the four branches). How much of the connection strength
goes through the bottlenecked branches, trained vs random? And do bottleneck neurons
respond to more classes than their neighbours (a proxy for polysemanticity: the number of
classes among a neuron's 100 most activating test images)?"""),
    ("code", """def shares(m):
    return {row["branch"]: row["share"] for row in block_shares(m, "mixed3b")["rows"]}

t, rs = shares(model), [shares(m) for m in randoms]
for b in ("1x1", "3x3", "5x5", "pool"):
    print(f"mixed3b {b:4s} branch: trained {t[b]:.2f}   random init {', '.join(f'{r[b]:.2f}' for r in rs)}")
claim("mixed3b: share of the connection through the 1x1 branch", t["1x1"], [r["1x1"] for r in rs], higher=False)

from circuits.datasets import load_fashion_mnist
images, labels = load_fashion_mnist("test")
images, labels = images[:1500], labels[:1500]
groups = ("1x1", "3x3_bottleneck", "5x5_bottleneck", "3x3", "5x5")
poly = {name: polysemanticity(m, ["mixed3b"], images, labels, 100) for name, m in [("trained", model), ("random 0", randoms[0])]}
for g in groups:
    print(f"mixed3b_{g:15s} classes among top-100 images: " + "   ".join(f"{k} {np.nanmedian(v[f'mixed3b_{g}']):.2f}" for k, v in poly.items()))"""),
    ("markdown", """Training moves the connection out of the direct 1x1 branch (its share drops from about
0.6, which is what the random architecture gives, to about 0.2) and into the 3x3 and 5x5
branches behind the bottlenecks: skipping the bottleneck is where most of the connection
is. Bottleneck neurons respond to more classes than the 3x3/5x5 neurons they feed — but
about as many as the 1x1 neurons that read the same input, and random networks show a
similar gap. So the class count says "early and generic", not "polysemantic because
compressed". `experiments/RESULTS.md` has the full study for all three blocks.

## Summary: every claim in this notebook, against its control"""),
    ("code", """for c in claims:
    print(("✔ " if c.beats else "✘ ") + c.caption())
print(f"\\n{sum(bool(c.beats) for c in claims)} of {len(claims)} claims beat their controls on this model.")"""),
    ("markdown", """## Where next

- `python experiments/make_gallery.py` regenerates every article figure on this model
  (`docs/gallery/`), each captioned with its claim and control; the numbers are in `outputs/`.
- `circuits run configs/story_neurons_fashion.yaml` reruns the story-neuron search (after
  retraining, say); `circuits run configs/bottleneck_fashion.yaml` the bottleneck study.
- `circuits explore` builds browsable neuron pages for the model's layers."""),
]


OWN_MODEL_CELLS: list[tuple[str, str]] = [
    ("markdown", """# Your own model: a torchvision ResNet-18

Every tool of `circuits` takes any `torch.nn.Module` and its own layer names. This notebook
runs them on a **torchvision ResNet-18 with random initialisation** (`weights=None`: nothing
is downloaded). Random weights have no features worth naming, so read this as *how to call
and read each tool*; on a trained model (`resnet18(weights="DEFAULT")`, or your checkpoint
loaded with `circuits.load_weights`) the same cells show the real thing.

Each result is shown by its own notebook display (an HTML card with small inlined PNGs),
so ending a cell with the result is enough.

*Regenerate:* `python experiments/make_notebook.py --notebook own_model`."""),
    ("code", """import os, warnings
warnings.filterwarnings("ignore", message="IProgress not found")
import torch
import torchvision

import circuits
from circuits.figures import neuron_figure

STEPS = int(os.environ.get("CIRCUITS_NOTEBOOK_STEPS", "32"))     # feature-visualization budget
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
model = torchvision.models.resnet18(weights=None).eval()         # random init: no download
print("render steps:", STEPS)
print(type(model).__name__, f"{sum(p.numel() for p in model.parameters()):,} parameters (random init)")"""),
    ("markdown", """## 1. Layer names

Layer names are the model's own module names (`layer1.0.conv2`); a module that runs twice in
one forward pass gets `name#1`, `name#2` (ResNet's shared `relu`). `list_layers` adds each
layer's output shape for an input size; 64x64 keeps this notebook fast."""),
    ("code", """rows = circuits.list_layers(model, input_shape=(3, 64, 64))
for r in rows:
    if r.name.startswith("layer1.0") or r.name in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4", "fc"):
        print(f"{r.name:18s} {r.type:12s} {str(r.output_shape):16s} {r.n_params:>9,} params")
print(f"... {len(rows)} rows in all")"""),
    ("markdown", """## 2. NMF of a convolution

One-sided NMF of each neuron's weights `[in, kh, kw]`: three spatial factors (drawn as R, G,
B) and their signed loadings on the 64 input channels. The display shows the picture, how
much of the weights the factors explain, and each factor's strongest inputs."""),
    ("code", """factors = circuits.neuron_factors(circuits.get_layer(model, "layer1.0.conv2"), 3, neurons=range(8))
factors"""),
    ("markdown", """## 3. Expanded weights across a residual block

`layer1.0 → layer1.1` is a whole block (two convs, batch norm, ReLUs and the skip
connection): not one kernel. `connection_weights` linearises the path (here at a 64x64
input) and returns the expanded weights; the display shows each output channel's strongest
inputs as red (excite) / blue (inhibit) maps and says what was frozen on the way."""),
    ("code", """conn = circuits.connection_weights(model, "layer1.0", "layer1.1", channels=[0, 1, 2], input_shape=(3, 64, 64))
conn"""),
    ("markdown", """## 4. A short render

Feature visualizations ("variable names"): an image optimised to excite a neuron. `size`
is the image, `resize_to` the size the model sees (ResNet-18 would otherwise see 224x224).
With random weights and few steps these are not meaningful pictures, only the mechanics."""),
    ("code", """result = circuits.render(model, ["layer2.1:3", "layer2.1:5"], steps=STEPS, size=64, resize_to=64,
                         progress=False, cache=None)
result"""),
    ("markdown", """## 5. A small-multiples figure

The figures return a `FigureResult` (the matplotlib figure and the arrays drawn), shown
inline; `.save("fig.png")` writes it. Here: the 8 strongest input slices of one neuron."""),
    ("code", """fig = neuron_figure(model, "heatmap", "layer1.1.conv1:0", upstream="layer1.0", top=8)
fig"""),
]


INSPECT_CELLS: list[tuple[str, str]] = [
    ("markdown", """# Weight inspection of a checkpoint

`circuits.inspect` reads a checkpoint file tensor by tensor, without the model's code:
statistics per tensor with flags, dead units and sparsity, histograms, and a diff between
two checkpoints. Here the checkpoint is written in the notebook from the bundled model
(`circuits.load_model()`, FashionInception trained on Fashion-MNIST), next to a *perturbed*
copy with three known defects — so every check has something real to find:

- two filters of `conv2d2` set to zero (dead units),
- one weight of `mixed4a_3x3_pre_relu_conv` set to NaN,
- 1% noise on the logits layer.

*Regenerate:* `python experiments/make_notebook.py --notebook inspect_checkpoint`."""),
    ("code", """import os, tempfile, warnings
from pathlib import Path
warnings.filterwarnings("ignore", message="IProgress not found")
import torch

import circuits
from circuits.inspect import checkpoint_stats, diff_checkpoints, plot_histograms

STEPS = int(os.environ.get("CIRCUITS_NOTEBOOK_STEPS", "32"))
torch.manual_seed(0)
torch.set_num_threads(min(2, torch.get_num_threads()))
model = circuits.load_model()
os.chdir(tempfile.mkdtemp(prefix="circuits-notebook-"))         # the files are written here, outside the repository
original = Path("fashion-inception.pth")
torch.save(model.state_dict(), original)

state = {k: v.clone() for k, v in model.state_dict().items()}
state["conv2d2_pre_relu_conv.weight"][[5, 17]] = 0.0
state["mixed4a_3x3_pre_relu_conv.weight"][3, 0, 1, 1] = float("nan")
state["logits.weight"] += 0.01 * state["logits.weight"].std() * torch.randn_like(state["logits.weight"])
perturbed = Path("perturbed.pth")
torch.save(state, perturbed)
print("render steps:", STEPS)
print(f"wrote {original.name} ({original.stat().st_size / 1e6:.1f} MB) and {perturbed.name}")"""),
    ("markdown", """## 1. Statistics of every tensor

One row per tensor (batch-norm buffers included, when a model has them): moments, norms,
the spectral norm, the share of near-zero weights, dead units, NaN/Inf counts and flags.
The trained checkpoint first:"""),
    ("code", """stats = checkpoint_stats(original)
stats"""),
    ("markdown", """## 2. Dead units and sparsity

The same table for the perturbed copy: the zeroed filters show up as dead units, the NaN is
counted (and flagged in red) — statistics are computed on the finite values, never silently
on NaN."""),
    ("code", """broken = checkpoint_stats(perturbed)
for row in broken:
    if row.dead_units or row.n_nan or row.n_inf:
        print(f"{row.name}: dead units {row.dead_units}, NaN {row.n_nan} (in units {row.nan_units}), Inf {row.n_inf}")
sparse = sorted(broken, key=lambda r: -r.near_zero)[:3]
print("most near-zero weights:", ", ".join(f"{r.name} {r.near_zero:.1%}" for r in sparse))
broken"""),
    ("markdown", """## 3. Histograms

The distribution of each weight tensor's finite values (a few tensors, evenly spread
through the model)."""),
    ("code", """hist = plot_histograms(torch.load(original), max_layers=6, ncols=3)
hist"""),
    ("markdown", """## 4. A diff against the perturbed copy

Tensor by tensor: relative change, cosine, the units that changed most. The three defects
are the only changes, and the NaN is reported as a changed NaN pattern."""),
    ("code", """diff = diff_checkpoints(original, perturbed)
print(diff.summary())
diff"""),
    ("markdown", """## 5. From a statistic to a neuron

Which `conv2d2` filter has the largest weight norm, and what does that neuron do? A neuron
card shows its variable name (feature visualization), its strongest inputs from `conv2d1`
with their weights, and the Fashion-MNIST test images that excite it most."""),
    ("code", """from circuits.datasets import load_fashion_mnist
from circuits.figures import neuron_card

w = circuits.get_layer(model, "conv2d2_pre_relu_conv").weight.detach()
strongest = int(w.flatten(1).norm(dim=1).argmax())
images, _ = load_fashion_mnist("test")
card = neuron_card(model, f"conv2d2:{strongest}", top=6, images=images[:1000], dataset_name="Fashion-MNIST test",
                   render={"steps": STEPS}, cache=None)
card"""),
]


NOTEBOOKS: dict[str, tuple[list[tuple[str, str]], int]] = {
    # name: (cells, default feature-visualization steps)
    "walkthrough": (CELLS, 256),
    "own_model": (OWN_MODEL_CELLS, 32),
    "inspect_checkpoint": (INSPECT_CELLS, 32),
}


def notebook_path(name: str) -> Path:
    """Where the notebook ``name`` is committed."""
    return ROOT / "notebooks" / f"{name}.ipynb"


def build(name: str = "walkthrough"):
    """The notebook ``name`` (nbformat v4) with its cells, not executed."""
    import nbformat

    if name not in NOTEBOOKS:
        raise ValueError(f"unknown notebook {name!r}; choose from {', '.join(NOTEBOOKS)}")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in NOTEBOOKS[name][0]:
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src))
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


def execute(nb, steps: int, timeout: int = 1800, cwd: Path = ROOT / "notebooks"):
    """Run every cell in a fresh ``python3`` kernel of this interpreter; returns the notebook."""
    import nbclient

    env_before = {k: os.environ.get(k) for k in ("CIRCUITS_NOTEBOOK_STEPS", "MPLBACKEND", "PATH", "PYTHONPATH")}
    os.environ["CIRCUITS_NOTEBOOK_STEPS"] = str(steps)
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(cwd)}})
        client.execute()
    finally:
        for k, v in env_before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    for cell in nb.cells:  # outputs only: no execution timestamps, so a rerun differs only where results do
        cell.get("metadata", {}).pop("execution", None)
    return nb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notebook", action="append", choices=list(NOTEBOOKS),
                        help="the notebook to build (repeatable; default: all)")
    parser.add_argument("--steps", type=int, default=None,
                        help="feature-visualization steps (default: CIRCUITS_NOTEBOOK_STEPS, else 256 for the walkthrough, 32 for the others)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (only with one --notebook)")
    args = parser.parse_args(argv)
    names = args.notebook or list(NOTEBOOKS)
    if args.out is not None and len(names) != 1:
        parser.error("--out needs exactly one --notebook")
    import nbformat

    from circuits._io import atomic_write_text

    for name in names:
        env_steps = os.environ.get("CIRCUITS_NOTEBOOK_STEPS")
        steps = args.steps if args.steps is not None else int(env_steps) if env_steps else NOTEBOOKS[name][1]
        nb = execute(build(name), steps)
        out = args.out or notebook_path(name)
        atomic_write_text(out, nbformat.writes(nb) + "\n")
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
