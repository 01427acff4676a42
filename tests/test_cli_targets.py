"""One target grammar on the command line: every command honours a target's position where it
has a meaning and refuses it, with the reason, where it has none; nothing is dropped."""

from __future__ import annotations

import pytest
import torch

from circuits.cli import main
from circuits.featurevis import render
from circuits.models import load_model

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_render_honours_a_position(capsys, tmp_path):
    code, out, err = _run(capsys, "render", "mixed3a:3@2,5", "mixed3a:3", "--out", str(tmp_path / "r"),
                          "--cache", str(tmp_path / "c"), *FAST)
    assert code == 0, err
    lines = dict(line.split("  objective ") for line in out.strip().splitlines())
    assert set(lines) == {str(tmp_path / "r" / "mixed3a_3_2_5.png"), str(tmp_path / "r" / "mixed3a_3.png")}
    res = render(load_model(), ["mixed3a:3@2,5", "mixed3a:3"], steps=2, cache=str(tmp_path / "c"), progress=False)
    assert res.from_cache == [True, True] and res.targets == ["mixed3a:3@2,5", "mixed3a:3"]
    assert float(lines[str(tmp_path / "r" / "mixed3a_3_2_5.png")]) == pytest.approx(float(res.objective_values[0]), rel=1e-3)


@pytest.mark.parametrize("argv, message", [
    (["figure", "small-multiples", "mixed3b:60@3,4", "--from", "mixed3a"], "has a position"),
    (["explore", "--neurons", "mixed3b:60@3,4", "--layers", "mixed3b"], "has a position"),
    (["explore", "--layers", "mixed3b:60"], "--layers takes layer names"),
    (["explore", "--upstream", "mixed3a:1"], "--upstream takes layer names"),
    (["expand", "mixed3a", "mixed3b:5"], "expand takes layer names"),
    (["nmf", "mixed3b:5"], "nmf takes layer names"),
    (["figure", "heatmap", "mixed3b:60", "--from", "mixed3a:2"], "--from takes layer names"),
    (["atlas", "--layers", "mixed3b:60@1,1", "--dry-run"], "--layers takes layer names"),
    (["render", "mixed3a"], "is a layer"),
])
def test_positions_and_channels_are_refused_with_the_reason(capsys, tmp_path, argv, message):
    code, _, err = _run(capsys, *argv, "--out", str(tmp_path / "o"), "--quiet")
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
