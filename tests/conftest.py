"""Shared fixtures. Tests run on CPU with few threads and never touch the network."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """``full_table`` tests (hours) run only when ``-m`` names them: ``pytest -m full_table``."""
    if "full_table" in (config.getoption("markexpr") or ""):
        return
    keep = [item for item in items if item.get_closest_marker("full_table") is None]
    if len(keep) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own CIRCUITS_CACHE so nothing leaks between tests or into ~/.cache."""
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def one_thread():
    """One torch (and BLAS/OpenMP) thread for a test module (its module fixtures included).

    The CPU is small and shared: for the tiny convolutions and per-channel loops of these
    tests, one thread is as fast, and two threads on a busy 2-core machine thrash.
    """
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def inception():
    from circuits.models import InceptionV1

    torch.manual_seed(0)
    return InceptionV1().eval()


@pytest.fixture(scope="module")
def fashion_random():
    """FashionInception at seed-0 random init (a fresh copy per test module: tests may edit it)."""
    import torch

    from circuits.models import FashionInception

    torch.manual_seed(0)
    return FashionInception().eval()


@pytest.fixture(scope="session")
def fashion_model():
    from circuits.models import load_model

    return load_model()
