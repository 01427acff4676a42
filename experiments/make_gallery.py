"""Regenerate the README gallery (``docs/gallery/``) from the figure scripts.

Runs every ``configs/*_fashion.yaml`` experiment (the article's figures and the bottleneck
study, on the bundled trained FashionInception, with the shared story neurons of
``configs/story_neurons_fashion.json``) into ``outputs/``, then copies each PNG figure into
``docs/gallery/`` (replacing it atomically). Every figure carries its claim and controls in
its caption; ``docs/gallery/claims.json`` collects them (merged across runs) and
``docs/gallery/CLAIMS.md`` lists them per figure. The numbers behind each figure stay in
``outputs/<config>/`` (``.npz``/``.json``/``.csv``).

    python experiments/make_gallery.py                 # all figures
    python experiments/make_gallery.py fig10 bottleneck  # only configs whose name contains these
    python experiments/make_gallery.py fig01 --set controls.random_init=1   # override config keys

The story neurons are not searched again here: ``circuits run configs/story_neurons_fashion.yaml``
does that (and rewrites the file every figure reads).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path


from circuits._io import atomic_path, atomic_write_text
from circuits.experiment import parse_overrides, run_experiment

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"explore_fashion", "story_neurons_fashion"}  # a CLI command config (neuron pages); the story search


def gallery_configs(filters: list[str]) -> list[Path]:
    configs = [p for p in sorted((ROOT / "configs").glob("*_fashion.yaml")) if p.stem not in SKIP]
    if filters:
        configs = [p for p in configs if any(f in p.stem for f in filters)]
    return configs


def claims_of(summary: dict) -> list[dict]:
    """The claims a script's summary carries (``claim``, ``claim_*``, or a ``claims`` mapping)."""
    out = [v for k, v in summary.items() if k.startswith("claim") and isinstance(v, dict) and "what" in v]
    out += [v for v in (summary.get("claims") or {}).values() if isinstance(v, dict) and "what" in v]
    return out


def caption(c: dict) -> str:
    def fmt(v):
        return "not run" if not v else (", ".join(f"{x:.2f}" for x in v) if len(v) <= 3 else f"{min(v):.2f}–{max(v):.2f} ({len(v)} draws)")

    parts = [f"random init {fmt(c['random_init'])}"]
    if c["shuffled"]:
        parts.append(f"{c.get('shuffled_name', 'shuffled')} {fmt(c['shuffled'])}")
    return f"{c['what']}: **{c['value']:.2f}** ({'; '.join(parts)}) — {c['verdict']}"


def write_claims(gallery: Path, new: dict[str, dict]) -> None:
    path = gallery / "claims.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged.update(new)
    atomic_write_text(path, json.dumps(merged, indent=1, sort_keys=True) + "\n")
    lines = ["# Gallery: each figure's claims and controls", "",
             "Written by `python experiments/make_gallery.py` from the figure scripts' JSON outputs (bundled trained "
             "FashionInception; random init = the same architecture re-initialised, seeded; see `experiments/_measures.py`).", ""]
    for name in sorted(merged):
        entry = merged[name]
        lines.append(f"## {name}")
        lines.append("")
        lines.append(" ".join(f"![{Path(p).stem}]({p})" for p in entry["figures"]))
        lines.append("")
        lines += [f"- {caption(c)}" for c in entry["claims"]]
        lines.append("")
    atomic_write_text(gallery / "CLAIMS.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filters", nargs="*", help="run only configs whose file name contains one of these")
    parser.add_argument("--gallery", type=Path, default=ROOT / "docs" / "gallery")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted for nested)")
    args = parser.parse_args(argv)

    configs = gallery_configs(args.filters)
    if not configs:
        parser.error(f"no configs/*_fashion.yaml matches {args.filters}")
    args.gallery.mkdir(parents=True, exist_ok=True)
    collected = {}
    for config in configs:
        start = time.time()
        result = run_experiment(config, {**parse_overrides(args.set), "out": str(args.outputs / config.stem)})
        pngs = [Path(f) for f in result["files"] if str(f).endswith(".png") and not Path(f).stem.endswith("_target")]
        for png in pngs:
            with atomic_path(args.gallery / png.name) as tmp:
                shutil.copyfile(png, tmp)
        collected[config.stem] = {"figures": [p.name for p in pngs], "claims": claims_of(result["summary"])}
        print(f"{config.name}: {', '.join(p.name for p in pngs)} ({time.time() - start:.0f} s)", flush=True)
        for c in collected[config.stem]["claims"]:
            print("   ", caption(c).replace("**", ""), flush=True)
    write_claims(args.gallery, collected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
