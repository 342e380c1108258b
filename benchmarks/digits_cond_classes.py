"""Does the class-conditional digits model make the digit it is asked for? For each class 0-9, `--num` digits
are sampled with that label (and `--num` with the null label, no class), at guidance 1 (the conditional model
alone), through `pndm_fast.sample` with a wrapper that passes the labels; each image goes through uint8, as a PNG
would hold it, and the shipped digits classifier (benchmarks/digits_classifier.py, 99% right on held-out real
digits) names its class. Prints, per asked class, the share classified as that class.

    python benchmarks/digits_cond_classes.py [--num 100] [--method F-PNDM] [--sample_step 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from anywhere, like the other benchmarks
    sys.path.insert(0, str(REPO))

from pndm_fast.config import load_config  # noqa: E402
from digits_classifier import load_classifier  # noqa: E402
from pndm_fast.images import to_uint8  # noqa: E402
from pndm_fast.runners.sample import image_shape, load_model, noise_for  # noqa: E402
from pndm_fast.sampling import sample  # noqa: E402
from pndm_fast.schedule import Schedule  # noqa: E402


class WithLabels(torch.nn.Module):
    """The conditional UNet as the (x, t) -> eps model that pndm_fast.sample calls, for fixed labels."""

    def __init__(self, net: torch.nn.Module, labels: torch.Tensor):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, y=self.labels)


def classified(net, classifier, schedule, label: int, num: int, method: str, steps: int, seed: int) -> torch.Tensor:
    """The classifier's class for `num` digits sampled with `label`; image i's noise is (seed, i)'s, the same
    for every label, so rows differ by the label alone."""
    noise = noise_for(range(num), image_shape({"Model": {"image_size": 16, "in_channels": 1}}), seed)
    labels = torch.full((num,), label, dtype=torch.long)
    x = sample(WithLabels(net, labels), noise, schedule, method=method, sample_step=steps, backend="torch")
    pixels = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return classifier(pixels).argmax(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=100, help="digits per label")
    parser.add_argument("--method", default="F-PNDM")
    parser.add_argument("--sample_step", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_path", help="default: the shipped pndm_fast/weights/digits-cond.safetensors")
    args = parser.parse_args(argv)
    config = load_config("digits-cond")
    net = load_model(config, args.model_path, "cpu", "fp32")
    schedule, classifier = Schedule.from_config(config["Schedule"]), load_classifier()
    num_classes = config["Model"]["num_classes"]
    start = time.perf_counter()
    print(f"digits-cond, {args.method} {args.sample_step} steps, guidance 1, {args.num} digits per label, "
          f"seed {args.seed}")
    print("| asked | classified as asked | most frequent other |")
    print("|---|---|---|")
    shares = []
    for label in range(num_classes):
        got = classified(net, classifier, schedule, label, args.num, args.method, args.sample_step, args.seed)
        share = float((got == label).double().mean())
        shares.append(share)
        others = torch.bincount(got[got != label], minlength=10)
        other = f"{int(others.argmax())} ({int(others.max())})" if others.sum() else "-"
        print(f"| {label} | {share:.1%} | {other} |")
    print(f"| mean | {sum(shares) / len(shares):.1%} | |")
    got = classified(net, classifier, schedule, num_classes, args.num, args.method, args.sample_step, args.seed)
    counts = torch.bincount(got, minlength=10).tolist()
    print(f"null label (no class): classified as 0-9 {counts}")
    print(f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
