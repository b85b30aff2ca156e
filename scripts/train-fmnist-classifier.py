#!/usr/bin/env python
"""Train the Fashion-MNIST classifier behind the ``fmnist-classifier`` extractor, reproducibly, on a CPU.

    OMP_NUM_THREADS=2 python scripts/train-fmnist-classifier.py [--out fewstep/metrics/weights] [--epochs 8]

Inputs are exactly what the toolkit trains on and generates: Fashion-MNIST padded to 1×32×32, pixels
``u8/127.5 − 1`` in [−1, 1] (``fewstep.data.fashion_mnist``). Fixed seeds, deterministic algorithms
and a fixed thread count (the float reduction order of CPU convolutions depends on it) make a rerun
on the same torch build give the same file. Training: the 60 000 train images, random horizontal
flips, Adam with a linear warm-up and cosine decay, batch 128; the test accuracy is measured on the
10 000 test images. Writes ``fmnist-classifier.safetensors`` and ``fmnist-classifier.json`` (SHA-256,
test accuracy, feature dimension, settings, the SHA-256 of the data files) into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fewstep.data.base import u8_to_float
from fewstep.data.fashion_mnist import FashionMNIST
from fewstep.metrics.classifier import WEIGHTS, FashionClassifier, file_sha256


def accuracy(net: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on uint8 images (N, 1, 32, 32)."""
    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            logits = net(u8_to_float(images[i:i + batch]))
            correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / len(images)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=WEIGHTS.parent, help="directory for the weights and record")
    ap.add_argument("--root", default=None, help="directory of the Fashion-MNIST IDX files (default: searched)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    train, test = FashionMNIST(args.root, "train"), FashionMNIST(args.root, "test")
    net = FashionClassifier()
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    steps_per_epoch = len(train.images) // args.batch
    total, warmup = args.epochs * steps_per_epoch, steps_per_epoch // 2
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * k / total)))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(train.images), generator=gen)
        flips = torch.rand(len(train.images), generator=gen) < 0.5
        running = 0.0
        for k in range(steps_per_epoch):
            idx = order[k * args.batch:(k + 1) * args.batch]
            x = u8_to_float(train.images[idx])
            x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(net(x), train.labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        acc = accuracy(net, test.images, test.labels)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {running / steps_per_epoch:.4f}, "
              f"test accuracy {acc:.4f} ({time.time() - t0:.0f} s)", flush=True)
    seconds = time.time() - t0
    test_acc = accuracy(net, test.images, test.labels)
    train_acc = accuracy(net, train.images[:10000], train.labels[:10000])

    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / "fmnist-classifier.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    record = {
        "file": weights.name,
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "test_accuracy": test_acc,
        "test_images": len(test.images),
        "train_accuracy_first_10k": train_acc,
        "feature_dim": net.feature_dim,
        "features": "penultimate layer: ReLU(fc(conv(x))), 128-d",
        "input": "1x32x32 float32 = u8/127.5 - 1 (Fashion-MNIST padded with background to 32)",
        "architecture": {"widths": list(net.widths), "feature_dim": net.feature_dim, "num_classes": 10},
        "training": {"epochs": args.epochs, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "optimizer": "Adam, linear warm-up over half an epoch, cosine decay to 0",
                     "augmentation": "random horizontal flip (p = 0.5)", "threads": threads,
                     "seconds": round(seconds, 1), "torch": torch.__version__, "python": platform.python_version()},
        "data_sha256": {p.name: file_sha256(p) for p in (*train.files, *test.files)},
        "script": "scripts/train-fmnist-classifier.py",
    }
    (args.out / "fmnist-classifier.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {weights} ({record['bytes']} bytes, sha256 {record['sha256']}); test accuracy {test_acc:.4f}")


if __name__ == "__main__":
    main()
