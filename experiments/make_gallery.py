"""Regenerate the README gallery (``docs/gallery/``) from the figure scripts.

Runs every ``configs/*_fashion.yaml`` experiment (the article's figures and the bottleneck
study, on the bundled trained FashionInception) into ``outputs/``, then copies each PNG
figure into ``docs/gallery/`` (replacing it atomically). The numbers behind each figure stay
in ``outputs/<config>/`` (``.npz``/``.json``/``.csv``).

    python experiments/make_gallery.py                 # all figures (~10 min on 2 CPU cores)
    python experiments/make_gallery.py fig10 bottleneck  # only configs whose name contains these
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from circuits._io import atomic_path
from circuits.experiment import run_experiment

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"explore_fashion"}  # a CLI command config (neuron pages), not a figure


def gallery_configs(filters: list[str]) -> list[Path]:
    configs = [p for p in sorted((ROOT / "configs").glob("*_fashion.yaml")) if p.stem not in SKIP]
    if filters:
        configs = [p for p in configs if any(f in p.stem for f in filters)]
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("filters", nargs="*", help="run only configs whose file name contains one of these")
    parser.add_argument("--gallery", type=Path, default=ROOT / "docs" / "gallery")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs")
    args = parser.parse_args(argv)

    configs = gallery_configs(args.filters)
    if not configs:
        parser.error(f"no configs/*_fashion.yaml matches {args.filters}")
    args.gallery.mkdir(parents=True, exist_ok=True)
    for config in configs:
        start = time.time()
        result = run_experiment(config, {"out": str(args.outputs / config.stem)})
        pngs = [Path(f) for f in result["files"] if str(f).endswith(".png")]
        for png in pngs:
            with atomic_path(args.gallery / png.name) as tmp:
                shutil.copyfile(png, tmp)
        print(f"{config.name}: {', '.join(p.name for p in pngs)} ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
