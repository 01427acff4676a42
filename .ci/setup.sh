#!/usr/bin/env bash
# Set up everything circuits needs on a fresh Debian machine (root, package registries only).
# Safe to run any number of times: each step is skipped when it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(dataset-fashion-mnist chromium chromium-driver)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi

# The distribution is `torch-circuits`. A distribution named `circuits` (this project's old
# name, or the unrelated event framework of that name on PyPI) installs the same top-level
# `circuits` package: remove it and force the reinstall below.
stamp=.venv/.circuits-installed
if .venv/bin/python -I -c "import importlib.metadata as m; m.distribution('circuits')" 2>/dev/null; then
  echo "setup: removing the distribution 'circuits' (it owns the same top-level package as torch-circuits)"
  .venv/bin/python -m pip uninstall -q -y circuits
  rm -f "$stamp"
fi

# Reinstall only when the dependency list changed.
want=$(cat pyproject.toml .ci/setup.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python packages into .venv (first time: several minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch/torchvision pinned: the versions this machine kind provides (torchvision from PyPI
  # does not load beside other torch builds).
  .venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/python -m pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
