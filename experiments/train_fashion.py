"""Train the embedded default model (FashionInception) on Fashion-MNIST and write its checkpoint.

    python experiments/train_fashion.py --out circuits/models/weights/fashion_inception.safetensors

Deterministic for a given seed on one machine (single data order, fixed init). Writes the
weights (safetensors, atomically) and a JSON sidecar with the numbers for the model card.

Training uses batch normalisation after every convolution (it converges in a few epochs on
2 CPU cores); before saving, each batch norm is folded into its convolution, so the shipped
model is the plain Lucid-style FashionInception: convolutions, ReLUs, pools, concatenations.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from circuits._io import atomic_path
from circuits.datasets import load_fashion_mnist
from circuits.models.fashion import FashionInception
from circuits.models.loading import save_state_dict


class ConvBN(nn.Module):
    """A convolution followed by batch norm, used during training only (folded before saving)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def add_batchnorm(model: FashionInception) -> None:
    for name, module in list(model.named_children()):
        if isinstance(module, nn.Conv2d):
            setattr(model, name, ConvBN(module))


@torch.no_grad()
def fold_batchnorm(trained: FashionInception) -> FashionInception:
    """Return a plain FashionInception whose convolutions absorb the trained batch norms."""
    plain = FashionInception()
    for name, module in trained.named_children():
        if isinstance(module, ConvBN):
            conv, bn = module.conv, module.bn
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            target = getattr(plain, name)
            target.weight.copy_(conv.weight * scale[:, None, None, None])
            target.bias.copy_((conv.bias - bn.running_mean) * scale + bn.bias)
        else:
            getattr(plain, name).load_state_dict(module.state_dict())
    return plain.eval()


@torch.no_grad()
def evaluate(model: FashionInception, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        logits = model(model.preprocess_input(images[i: i + 1000]))
        correct += (logits.argmax(1) == labels[i: i + 1000]).sum().item()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="circuits/models/weights/fashion_inception.safetensors")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    model = FashionInception()
    add_batchnorm(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = (len(train_x) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    start, cpu_start = time.time(), time.process_time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}")
        for step in bar:
            idx = order[step * args.batch_size: (step + 1) * args.batch_size]
            x = train_x[idx]
            # light augmentation: random horizontal flips (clothes are left/right symmetric)
            flip = torch.rand(len(x), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(model.preprocess_input(x)), train_y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        print(f"epoch {epoch + 1}: test accuracy {evaluate(model, test_x, test_y):.4f}")
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    model.eval()
    plain = fold_batchnorm(model)
    probe = model.preprocess_input(test_x[:256])
    drift = (plain(probe) - model(probe)).abs().max().item()
    assert drift < 1e-3, f"folding batch norm changed the logits by {drift}"
    model = plain
    accuracy = evaluate(model, test_x, test_y)
    out = Path(args.out)
    save_state_dict(model.state_dict(), out)
    meta = {
        "test_accuracy": accuracy,
        "train_seconds_wall": round(seconds, 1),
        "train_seconds_cpu": round(cpu_seconds, 1),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    with atomic_path(out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
