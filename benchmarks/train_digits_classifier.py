"""Train the digits classifier whose features the digits Frechet-distance benchmark uses, and ship its weights.

Trains pndm_fast.digits_classifier.DigitsClassifier on scikit-learn's digits at 16x16 (exactly the images the
bundled diffusion model was trained on) minus the held-out fifth, prints the held-out accuracy, and writes
benchmarks/weights/digits_classifier.safetensors. Seeded, single-threaded: the same weights on every run of the
same torch build (about 20 CPU-seconds).

    python benchmarks/train_digits_classifier.py [--epochs N] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from digits_classifier import (  # noqa: E402
    DigitsClassifier, digits_with_labels, held_out_indices, test_accuracy, weights_path)
from pndm_fast.models import save_state_dict  # noqa: E402

SEED = 0
BATCH = 64
LR = 2e-3


def shifted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each (1, 16, 16) image moved by up to 1 pixel each way (zeros shifted in): generated digits are not
    centred to the pixel as the real ones are, and the features should not care."""
    out = torch.zeros_like(x)
    dy, dx = torch.randint(-1, 2, (2, len(x)), generator=gen).tolist()
    for i in range(len(x)):
        ys, xs = slice(max(dy[i], 0), 16 + min(dy[i], 0)), slice(max(dx[i], 0), 16 + min(dx[i], 0))
        yd, xd = slice(max(-dy[i], 0), 16 + min(-dy[i], 0)), slice(max(-dx[i], 0), 16 + min(-dx[i], 0))
        out[i, :, ys, xs] = x[i, :, yd, xd]
    return out


def train(epochs: int) -> DigitsClassifier:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    images, labels = digits_with_labels()
    train_idx = torch.from_numpy(np.setdiff1d(np.arange(len(images)), held_out_indices(len(images))))
    x, y = images[train_idx], labels[train_idx]
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * -(-len(x) // BATCH))
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for first in range(0, len(x), BATCH):
            idx = order[first: first + BATCH]
            loss = F.cross_entropy(model(shifted(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if epoch % 5 == 4 or epoch == epochs - 1:
            print(f"epoch {epoch + 1:>3}  train loss {total / len(x):.4f}", flush=True)
    return model.eval()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--out", default=weights_path(), help="where the safetensors weights go")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one summation order: the same weights bit for bit on every run
    start = time.perf_counter()
    model = train(args.epochs)
    accuracy = test_accuracy(model)
    save_state_dict(model.state_dict(), args.out)
    print(f"held-out accuracy {accuracy:.4f} on {len(held_out_indices())} digits; wrote {args.out} "
          f"in {time.perf_counter() - start:.0f} s")
    return accuracy


if __name__ == "__main__":
    main()
