"""`circuits diff A B`: the command line over circuits.inspect.diff_report."""

from __future__ import annotations

import json

import torch

from circuits.cli import main
from circuits.models import save_state_dict


def test_diff_command(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.pth"
    w = torch.randn(6, 4)
    save_state_dict({"fc.weight": w, "fc.bias": torch.zeros(6), "gone": torch.ones(2)}, a)
    changed = w.clone()
    changed[3] += 1.0
    torch.save({"fc.weight": changed, "fc.bias": torch.zeros(6), "new": torch.ones(3)}, b)
    assert main(["diff", str(a), str(b), "--format", "json", "--quiet", "--out", str(tmp_path / "d")]) == 0
    doc = json.loads(capsys.readouterr().out)
    text = json.dumps(doc)
    assert "gone" in text and "new" in text and "fc.weight" in text
    assert (tmp_path / "d" / "diff.html").is_file() and (tmp_path / "d" / "diff.json").is_file()
    assert main(["diff", str(a), str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("circuits: error:") and "missing.pth" in err and err.count("\n") == 1
    assert main(["diff", str(a), str(b), "--format", "html"]) == 2  # html needs --out
