"""Sample quality on the bundled digits model: Frechet distance of classifier features, per method and step count.

Every method of pndm_fast.METHODS samples `--num` digits at 5, 10, 20 and 50 steps from the same
noise (image i's noise depends only on (seed, i)), so rows differ by the method alone. Each image goes through
uint8, as the PNGs of `--runner sample` would hold it, then through the small digits classifier
(benchmarks/digits_classifier.py); the Frechet distance (FD) of its 64-d penultimate features is taken against all
1797 real digits, quantized the same way. Two baselines say which differences mean something: the FD between two
halves of the real digits (the floor: what two samples of the *same* distribution give), and the FD of one
configuration sampled from two seeds (how much a row moves with the noise alone).

The generated images are cached in benchmarks/results/digits_samples.npz (uint8, keyed by method, steps and seed,
with the diffusion weights' hash), so a rerun, or a run after a method was added, samples only what is missing.

    python benchmarks/accuracy_digits.py [--quick] [--num N] [--seed S] [--cache PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as a script from anywhere, like the other benchmarks
    sys.path.insert(0, str(REPO))

from pndm_fast.atomic import atomic_path  # noqa: E402
from pndm_fast.config import load_config  # noqa: E402
from pndm_fast.frechet import frechet_distance, statistics  # noqa: E402
from pndm_fast.images import to_uint8  # noqa: E402
from pndm_fast.methods import METHODS, build_plan  # noqa: E402
from pndm_fast.runners.sample import image_shape, load_model, noise_for, resolve_model_path  # noqa: E402
from pndm_fast.sampling import sample  # noqa: E402
from pndm_fast.schedule import Schedule  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CACHE = RESULTS / "digits_samples.npz"
PLOT = REPO / "docs" / "digits_fd.png"
STEPS = {"full": (5, 10, 20, 50), "quick": (5,)}
NUM = {"full": 2000, "quick": 32}
REAL_DRAWS = 10  # random real subsets averaged for the floor at the cells' sample size
SPREAD_METHOD = "F-PNDM"  # the configuration sampled from a second seed; its step count is the middle one listed
BATCH = 500  # the 0.7 M-parameter UNet at 16x16 runs ~3x more images/s on 2 cores at batch 500 than at 100


def weights_hash(config: dict) -> str:
    """A short hash of the diffusion checkpoint: cached samples of other weights are never reused."""
    with open(resolve_model_path(None, config), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


class SampleCache:
    """Generated digits as uint8 (N, 16, 16) arrays, one per "method/steps/seed" key, in one .npz file.

    A key holding more images than asked serves its first `num` (image i's noise is the same whatever the count).
    Each write re-reads the file and merges, then renames it into place, so an interrupted run keeps what it had.
    """

    def __init__(self, path: Path | None, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint

    def _load(self) -> dict[str, np.ndarray]:
        if self.path is None or not self.path.is_file():
            return {}
        with np.load(self.path) as data:
            if "fingerprint" not in data or str(data["fingerprint"]) != self.fingerprint:
                return {}
            return {k: data[k] for k in data.files if k != "fingerprint"}

    def get(self, key: str, num: int) -> np.ndarray | None:
        """The first `num` images of `key`, or as many as are cached when fewer (None when none)."""
        images = self._load().get(key)
        return None if images is None else images[:num]

    def put(self, key: str, images: np.ndarray) -> None:
        if self.path is None:
            return
        entries = self._load()
        if key in entries and len(entries[key]) >= len(images):
            return
        entries[key] = images
        # a file object: np.savez would append .npz to the temporary name
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, fingerprint=np.array(self.fingerprint), **entries)


class Generator:
    """The bundled digits model, sampling uint8 digits (N, 16, 16) for (method, steps, seed), through the cache."""

    def __init__(self, cache_path: Path | None, batch: int = BATCH, log=print):
        self.config = load_config("digits")
        self.model = load_model(self.config, None, "cpu", "fp32")
        self.schedule = Schedule.from_config(self.config["Schedule"])
        self.shape = image_shape(self.config)
        self.cache = SampleCache(cache_path, weights_hash(self.config))
        self.batch, self.log = batch, log

    def model_calls(self, method: str, steps: int) -> int:
        return build_plan(self.schedule, method, steps).model_calls

    def images(self, method: str, steps: int, seed: int, num: int) -> np.ndarray:
        key = f"{method}/{steps}/{seed}"
        cached = self.cache.get(key, num)
        if cached is not None and len(cached) == num:
            return cached
        # Top up from the first missing index: image i depends only on (seed, i), so a cache grown over several
        # runs holds the same digits as one long run (up to the batch-composition rounding of the CPU UNet).
        have = 0 if cached is None else len(cached)
        start, parts = time.perf_counter(), [] if cached is None else [cached]
        for first in range(have, num, self.batch):
            noise = noise_for(range(first, min(first + self.batch, num)), self.shape, seed)
            with torch.inference_mode():
                x = sample(self.model, noise, self.schedule, method, steps, backend="fused")
            parts.append(to_uint8(x)[..., 0])
        images = np.concatenate(parts)
        seconds = time.perf_counter() - start
        calls = self.model_calls(method, steps) * (num - have)
        self.log(f"  sampled {key} x{num - have}: {seconds:.0f} s, {calls / seconds:.0f} image-model-calls/s")
        self.cache.put(key, images)
        return images


def real_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 real digits as uint8 (N, 16, 16), quantized exactly as generated ones are, and their labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    from pndm_fast.data import load_digits

    images = load_digits(16, 1).images  # (1797, 1, 16, 16) in [0, 1]
    return to_uint8(images * 2 - 1)[..., 0], sklearn_digits().target


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in [0, 1], what the classifier reads."""
    return torch.from_numpy(images).float().unsqueeze(1) / 255.0


def label_entropy(labels: np.ndarray) -> float:
    """Entropy in bits of the predicted-label histogram: log2(10) = 3.32 for balanced classes, 0 for one class."""
    p = np.bincount(labels, minlength=10) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def real_halves(num_real: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of the real digits' indices into two halves."""
    order = np.random.default_rng(seed).permutation(num_real)
    return order[: num_real // 2], order[num_real // 2:]


def plot(rows: list[dict], floor: float, real_at_n: float, path: Path) -> bool:
    """FD against NFE per method, on log axes; False (nothing drawn) when matplotlib is absent."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in mine], [r["fd"] for r in mine], marker="o", label=method)
    ax.axhline(real_at_n, color="black", linestyle=":", linewidth=1, label=f"{rows[0]['num']} real digits vs all")
    ax.axhline(floor, color="grey", linestyle="--", linewidth=1, label="real half vs half")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # plain numbers on the log axes: "20", not "2 x 10^1"
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({r["nfe"] for r in rows if r["method"] == rows[0]["method"]}))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
                   if floor / 2 <= v <= 2 * max(r["fd"] for r in rows)])
    ax.set_xlabel("model calls per image (NFE)")
    ax.set_ylabel("Frechet distance (digits classifier features)")
    ax.set_title(f"Digits, {rows[0]['num']} samples per point")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def markdown(rows: list[dict], steps: tuple[int, ...], extra: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["steps"]): r for r in rows}
    head = "| method | " + " | ".join(f"{s} steps: FD (NFE)" for s in steps) + " |"
    lines = [head, "|---|" + "---|" * len(steps)]
    for method in methods:
        cells = [f"{cell[method, s]['fd']:.3g} ({cell[method, s]['nfe']})" for s in steps]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    ent = ["| method | " + " | ".join(f"{s} steps" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for method in methods:
        ent.append(f"| {method} | " + " | ".join(f"{cell[method, s]['label_entropy']:.3f}" for s in steps) + " |")
    n = rows[0]["num"]
    return "\n".join([
        "## Digits: Frechet distance of classifier features",
        "",
        f"{n} digits per cell from the bundled digits model (`pndm_fast/weights/digits.safetensors`), the same noise "
        f"(seed {extra['seed']}) in every cell, against all {extra['num_real']} real digits (scikit-learn's 8x8 "
        "digits upscaled to 16x16). Features: the 64-d penultimate layer of the small digits classifier "
        f"(`benchmarks/digits_classifier.py`, {extra['accuracy']:.1%} on its held-out digits). FD is not FID: "
        "it is on a different feature space and only comparable within this table. Lower is better; NFE is the "
        "number of model calls per image.",
        "",
        *lines,
        "",
        f"- Floor at this sample size: {n} real digits drawn at random with replacement score FD "
        f"{extra['real_at_n']:.3g} (std {extra['real_at_n_spread']:.2g} over {REAL_DRAWS} draws) against all of "
        "them, about what a perfect sampler would get with this many images.",
        f"- Floor of the data: two halves of the real digits ({extra['half']} vs {extra['num_real'] - extra['half']}) "
        f"are FD {extra['floor']:.3g} apart.",
        f"- Seed spread: {extra['spread_key']} from seed {extra['seed']} gives FD {extra['fd_seed_a']:.3g}, from "
        f"seed {extra['seed2']} {extra['fd_seed_b']:.3g} (difference {extra['seed_spread']:.3g}); "
        "differences between cells of that size are noise. Every cell shares seed 0's noise, so differences "
        "between methods are less noisy than that.",
        "",
        "Entropy (bits) of the classifier's predicted labels, a check that no method collapses onto a few digits "
        f"(real digits: {extra['real_entropy']:.3f}, the maximum is log2 10 = 3.322):",
        "",
        *ent,
        "",
        f"`{extra['command']}` ({extra['seconds']:.0f} s, of which {extra['sample_seconds']:.0f} s sampling "
        "not served by the cache).",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"{NUM['quick']} digits at {STEPS['quick']} steps only")
    p.add_argument("--num", type=int, help=f"digits per cell (default {NUM['full']}, --quick {NUM['quick']})")
    p.add_argument("--steps", type=int, nargs="+", help="step counts (default 5 10 20 50, --quick 5)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every cell")
    p.add_argument("--seed2", type=int, default=1, help="the second seed of the seed-spread configuration")
    p.add_argument("--batch_size", type=int, default=BATCH)
    p.add_argument("--cache", type=Path, default=CACHE, help="the sample cache (.npz); 'none' for no cache")
    p.add_argument("--plot", type=Path, default=PLOT, help="FD vs NFE plot (PNG); 'none' for no plot")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    args.num = args.num or NUM[mode]
    args.steps = tuple(args.steps or STEPS[mode])
    if args.num < 2 or min(args.steps) < 1:
        p.error("--num must be at least 2 and --steps at least 1")
    args.cache = None if str(args.cache) == "none" else args.cache
    args.plot = None if str(args.plot) == "none" else args.plot
    return args


def main(argv: list[str] | None = None, log=print) -> tuple[str, list[dict]]:
    """Sample, score and tabulate; returns (markdown text, one dict per method x steps cell)."""
    from digits_classifier import load_classifier, test_accuracy

    argv = list(argv or [])  # never sys.argv: a caller's own flags are not ours
    args = parse_args(argv)
    start = time.perf_counter()
    gen = Generator(args.cache, args.batch_size, log)
    classifier = load_classifier()

    @torch.inference_mode()
    def features_and_labels(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = to_unit(images)
        feats = classifier.features(x)
        return feats.double().numpy(), classifier.head(feats).argmax(1).numpy()

    real, _ = real_digits()
    real_feats, real_pred = features_and_labels(real)
    mu_real, sigma_real = statistics(real_feats)
    a, b = real_halves(len(real))
    floor = frechet_distance(*statistics(real_feats[a]), *statistics(real_feats[b]))
    # What a perfect sampler would score with this many images: FD's bias grows as the sample shrinks. Drawn with
    # replacement (a bootstrap of the real digits), so sizes past the 1797 real digits are not all of them.
    draws = np.random.default_rng(args.seed)
    at_n = [frechet_distance(*statistics(real_feats[draws.choice(len(real), args.num, replace=True)]),
                             mu_real, sigma_real) for _ in range(REAL_DRAWS)]

    sampling = 0.0

    def scored(method: str, steps: int, seed: int) -> dict:
        nonlocal sampling
        t0 = time.perf_counter()
        images = gen.images(method, steps, seed, args.num)
        sampling += time.perf_counter() - t0
        feats, pred = features_and_labels(images)
        return {"method": method, "steps": steps, "seed": seed, "num": args.num,
                "nfe": gen.model_calls(method, steps), "fd": frechet_distance(*statistics(feats), mu_real, sigma_real),
                "label_entropy": label_entropy(pred)}

    rows = []
    for method in METHODS:
        for steps in args.steps:
            rows.append(scored(method, steps, args.seed))
            log(f"{method:>14} {steps:>3} steps  NFE {rows[-1]['nfe']:>3}  FD {rows[-1]['fd']:.4g}")
    spread_steps = args.steps[len(args.steps) // 2]
    spread_method = SPREAD_METHOD if SPREAD_METHOD in METHODS else next(iter(METHODS))
    first = next(r for r in rows if r["method"] == spread_method and r["steps"] == spread_steps)
    second = scored(spread_method, spread_steps, args.seed2)
    extra = {"seed": args.seed, "seed2": args.seed2, "num_real": len(real), "half": len(a), "floor": floor,
             "accuracy": test_accuracy(classifier), "real_at_n": float(np.mean(at_n)),
             "real_at_n_spread": float(np.std(at_n)), "real_entropy": label_entropy(real_pred),
             "spread_key": f"{spread_method} at {spread_steps} steps", "fd_seed_a": first["fd"],
             "fd_seed_b": second["fd"], "seed_spread": abs(first["fd"] - second["fd"]),
             "seconds": time.perf_counter() - start, "sample_seconds": sampling,
             "command": " ".join(["python benchmarks/accuracy_digits.py", *argv])}
    if args.plot is not None:
        plot(rows, floor, extra["real_at_n"], args.plot)
    text = markdown(rows, args.steps, extra)
    for row in rows:
        row.update({k: extra[k] for k in ("floor", "real_at_n", "seed_spread")})
    return text, rows


if __name__ == "__main__":
    print(main(sys.argv[1:])[0])
