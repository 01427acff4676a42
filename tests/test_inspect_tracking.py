"""watch(): weights, gradients and update-to-weight ratios per layer over a real training loop,
through optimizer hooks that are gone after the context."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from circuits.inspect import ScalarWriter, watch
from circuits.models import FashionInception

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _train(model, opt, steps: int, record=None):
    x, y = _data()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if record is not None:
            record.append(({n: p.detach().clone() for n, p in model.named_parameters()},
                           {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}))
        opt.step()


def test_sgd_loop_logs_grads_weights_and_update_ratios(tmp_path):
    torch.manual_seed(0)
    model = FashionInception()
    lr = 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    record: list = []
    with watch(model, tmp_path / "m.csv", every=2) as w:
        _train(model, opt, 5, record)
    assert w.logged_steps == [0, 2, 4] and w.step == 5
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    values = {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows}
    assert {s for s, _ in values} == {0, 2, 4}
    for step in (0, 2, 4):
        before, grads = record[step]
        for name in ("logits.weight", "conv2d0_pre_relu_conv.weight", "mixed4a_5x5_pre_relu_conv.bias"):
            g, w0 = grads[name].double(), before[name].double()
            assert values[(step, f"grads/{name}/norm")] == pytest.approx(g.norm().item(), rel=1e-9)
            assert values[(step, f"grads/{name}/max_abs")] == pytest.approx(g.abs().max().item(), rel=1e-9)
            assert values[(step, f"grads/{name}/nonfinite")] == 0
            # plain SGD: W_after - W_before = -lr * grad
            # (rel 1e-2: the step is ~1e-5 of the weights, which are float32)
            assert values[(step, f"updates/{name}/ratio")] == pytest.approx(lr * g.norm().item() / w0.norm().item(), rel=1e-2)
            after = record[step + 1][0][name].double() if step + 1 < len(record) else dict(model.named_parameters())[name].detach().double()
            assert values[(step, f"weights/{name}/norm")] == pytest.approx(after.norm().item(), rel=1e-9)
    # the hooks are gone: more steps log nothing
    _train(model, opt, 3)
    assert w.logged_steps == [0, 2, 4] and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_global_hooks_follow_only_this_models_optimizers(tmp_path):
    from torch.optim import optimizer as optim_module

    torch.manual_seed(0)
    model, other = nn.Linear(4, 3), nn.Linear(4, 3)
    opt, other_opt = torch.optim.Adam(model.parameters(), lr=1e-2), torch.optim.SGD(other.parameters(), lr=0.1)
    writer = ScalarWriter(tmp_path / "m.json")
    x = torch.randn(8, 4)
    with watch(model, writer, every=1) as w:
        for _ in range(3):
            for m, o in ((model, opt), (other, other_opt)):
                o.zero_grad()
                m(x).pow(2).mean().backward()
                o.step()
    assert w.logged_steps == [0, 1, 2]
    assert not optim_module._global_optimizer_pre_hooks and not optim_module._global_optimizer_post_hooks
    data = json.loads((tmp_path / "m.json").read_text())["scalars"]
    assert {d["tag"] for d in data} >= {"updates/weight/ratio", "grads/bias/norm", "weights/weight/std"}
    ratios = writer.scalars("updates/weight/ratio")
    assert [s for s, _ in ratios] == [0, 1, 2] and all(0 < v < 1 for _, v in ratios)


def test_nonfinite_gradients_are_counted_and_zero_weights_noted(tmp_path):
    model = nn.Linear(3, 2)
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = ScalarWriter(tmp_path / "m.csv")
    with watch(model, writer, every=1, optimizer=opt) as w:
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        model.bias.grad[0] = float("nan")
        opt.step()
    assert writer.scalars("grads/bias/nonfinite") == [(0, 1.0)]
    assert writer.scalars("updates/weight/ratio") == []  # no ratio from all-zero weights...
    assert any("no update ratio for weight (its weights were all zero)" in n for n in w.notes)  # ...and it is said
    assert writer.scalars("updates/bias/ratio") == []  # the NaN gradient made the bias NaN
    assert "step 0: no update ratio for bias (the update is not finite)" in w.notes
    assert writer.scalars("weights/bias/nonfinite") == [(0, 1.0)]


def test_tensorboard_writer_gets_scalars_and_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(10, 6), torch.randint(0, 2, (10,))
    with watch(model, tmp_path / "run", every=3, histograms=True) as w:
        for _ in range(7):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    assert w.logged_steps == [0, 3, 6]
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={HISTOGRAMS: 0, SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("updates/0.weight/ratio")] == [0, 3, 6]
    assert "grads/2.bias" in acc.Tags()["histograms"] and "weights/0.weight" in acc.Tags()["histograms"]


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        watch({"w": torch.ones(1)}, "x.csv")
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        watch(nn.Linear(2, 2), "x.csv", every=0)
    with pytest.raises(ValueError, match=".csv or .json"):
        ScalarWriter("metrics.txt")
