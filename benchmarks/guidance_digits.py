"""Classifier-free guidance on the bundled class-conditional digits model: for guidance w in 0, 1, 2, 4 and a few
model-call budgets, `--num` digits of every class are sampled through pndm_fast.sample with a Denoiser (one
batched forward per step, the guided eps folded into the fused combination); the shipped digits classifier names
each image's class and gives its 64-d features. Per cell: the share classified as the asked class, and the
Fréchet distance of each class's samples to the real digits of that class (mean over classes), beside the same
distance for `--num` real digits of each class drawn with replacement (the floor at this sample size).

    python benchmarks/guidance_digits.py [--num 100] [--seed 0] [--no_doc]

Prints the table and writes it into docs/accuracy.md (its own marked section; the rest of the page is kept).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import common  # noqa: E402
from accuracy_digits import real_digits, to_unit  # noqa: E402
from pndm_fast import Denoiser, pretrained, sample  # noqa: E402
from digits_classifier import load_classifier  # noqa: E402
from pndm_fast.frechet import frechet_distance, statistics  # noqa: E402
from pndm_fast.images import to_uint8  # noqa: E402
from pndm_fast.runners.sample import noise_for  # noqa: E402

GUIDANCE = (0.0, 1.0, 2.0, 4.0)
# (method, steps): model calls 5, 10 and 20 with one call per step
BUDGETS = (("DDIM", 5), ("UniPC-bh2", 5), ("UniPC-bh2", 10), ("F-PNDM", 20))


def features_and_labels(classifier, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        feats = classifier.features(to_unit(images))
        return feats.double().numpy(), classifier.head(feats).argmax(1).numpy()


def class_fd(feats: np.ndarray, real_feats: np.ndarray) -> float:
    return frechet_distance(*statistics(feats), *statistics(real_feats))


def run(num: int, seed: int, log=print) -> str:
    net, schedule = pretrained("digits-cond")
    classifier = load_classifier()
    real, real_labels = real_digits()
    real_feats, _ = features_and_labels(classifier, real)
    by_class = {c: real_feats[real_labels == c] for c in range(10)}
    rng = np.random.default_rng(seed)
    floor = np.mean([class_fd(by_class[c][rng.integers(0, len(by_class[c]), num)], by_class[c]) for c in range(10)])
    labels = torch.arange(10).repeat_interleave(num)
    noise = noise_for(range(10 * num), (1, 16, 16), seed)
    rows = []
    for method, steps in BUDGETS:
        for w in GUIDANCE:
            start = time.perf_counter()
            guided = Denoiser(net, cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)}, guidance=w)
            x = sample(guided, noise, schedule, method, steps, timesteps="uniform" if method != "UniPC-bh2" else "logsnr")
            images = to_uint8(x)[..., 0]
            feats, predicted = features_and_labels(classifier, images)
            share = float((predicted == labels.numpy()).mean())
            fd = np.mean([class_fd(feats[labels.numpy() == c], by_class[c]) for c in range(10)])
            calls = int(steps) if method != "F-PNDM" else 4 * 3 + steps - 3
            rows.append((method, steps, calls, w, share, fd))
            log(f"{method} {steps} steps ({calls} calls), guidance {w:g}: {share:.1%} as asked, class FD {fd:.2f} "
                f"({time.perf_counter() - start:.0f} s)")
    lines = ["## Classifier-free guidance on the class-conditional digits model", "",
             f"Measured by `python benchmarks/guidance_digits.py --num {num} --seed {seed}`. "
             f"digits-cond, {num} digits per class, seed {seed}; class FD = Fréchet distance of a class's samples "
             f"to that class's real digits in the classifier's 64-d features, mean over the 10 classes; floor "
             f"({num} real digits per class drawn with replacement): {floor:.2f}", "",
             "| method (grid) | model calls | guidance | classified as asked | class FD |", "|---|---|---|---|---|"]
    for method, steps, calls, w, share, fd in rows:
        grid = "logsnr" if method == "UniPC-bh2" else "uniform"
        lines.append(f"| {method} ({grid}) | {calls} | {w:g} | {share:.1%} | {fd:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num", type=int, default=100, help="digits per class and cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_doc", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    table = run(args.num, args.seed)
    print(table)
    if not args.no_doc:
        common.write_marked_section(REPO / "docs" / "accuracy.md", "benchmarks/guidance_digits.py", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
