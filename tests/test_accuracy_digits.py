"""The digits Frechet-distance study: the shipped classifier recognises held-out digits, its features separate real
digits from noise by far more than two halves of the real digits differ, and the benchmark's quick mode
produces a row for every registered method (served from its cache the second time)."""

import importlib.util

import accuracy_digits
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from digits_classifier import held_out_indices, load_classifier

from pndm_fast.config import load_config
from pndm_fast.frechet import frechet_distance, statistics
from pndm_fast.methods import METHODS, build_plan
from pndm_fast.schedule import Schedule


@pytest.fixture(scope="module")
def real():
    """scikit-learn's digits rebuilt here from the raw 8x8 arrays (values 0..16), upscaled bilinearly to 16x16,
    (1797, 1, 16, 16) in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False), digits.target


def test_classifier_recognises_held_out_digits(real):
    images, labels = real
    idx = held_out_indices(len(images))
    assert len(idx) == 360 and len(np.unique(labels[idx])) == 10
    with torch.inference_mode():
        predicted = load_classifier()(images[idx]).argmax(1).numpy()
    assert (predicted == labels[idx]).mean() > 0.95


def test_real_halves_are_far_closer_than_noise_is_to_real(real):
    images, _ = real
    net = load_classifier()
    noise = torch.rand(len(images), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = F.avg_pool2d(noise, 3, 1, 1)  # smoother noise, closer in brightness to strokes: a harder case
    with torch.inference_mode():
        feats = net.features(images).double().numpy()
        noise_stats = [statistics(net.features(x).double().numpy()) for x in (noise, blurred)]
    a, b = accuracy_digits.real_halves(len(images))
    assert len(set(a) & set(b)) == 0 and len(a) + len(b) == len(images)
    floor = frechet_distance(*statistics(feats[a]), *statistics(feats[b]))
    real_stats = statistics(feats)
    for stats in noise_stats:
        assert frechet_distance(*stats, *real_stats) > 20 * floor


def test_label_entropy():
    assert accuracy_digits.label_entropy(np.arange(1000) % 10) == pytest.approx(np.log2(10))
    assert accuracy_digits.label_entropy(np.full(50, 3)) == 0.0
    assert accuracy_digits.label_entropy(np.array([0, 1, 0, 1])) == pytest.approx(1.0)


# one_thread (tests/conftest.py): a 16x16 UNet at batch 8 is too small to split over threads; on a busy shared CPU
# two OpenMP threads wait on each other at every convolution (measured here: 108 s for the quick run with two, 24 s
# with one).


def independent_fd_and_entropy(images: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """FD of the classifier's features against the real digits' (numpy moments, scipy's sqrtm) and the entropy
    in bits of the predicted labels, written here without the study's code."""
    net = load_classifier()
    with torch.inference_mode():
        feats = [net.features(torch.from_numpy(x).float().unsqueeze(1) / 255.0).double().numpy()
                 for x in (images, real)]
        labels = net.head(net.features(torch.from_numpy(images).float().unsqueeze(1) / 255.0)).argmax(1).numpy()
    (mu1, mu2), (s1, s2) = [f.mean(0) for f in feats], [np.cov(f, rowvar=False) for f in feats]
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))
    p = np.unique(labels, return_counts=True)[1] / len(labels)
    return fd, float(-(p * np.log2(p)).sum())


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 8 images: a singular covariance
def test_quick_run_has_a_row_for_every_method_and_reruns_from_the_cache(tmp_path, monkeypatch, one_thread):
    """Each row's FD and label entropy are those of its cached images, recomputed independently (planted: the
    study scoring every method on the first method's images, or on the real digits, fails)."""
    argv = ["--quick", "--steps", "2", "--num", "8", "--batch_size", "8", "--cache", str(tmp_path / "cache.npz"),
            "--plot", str(tmp_path / "fd.png")]
    text, rows = accuracy_digits.main(argv, log=lambda *_: None)
    schedule = Schedule.from_config(load_config("digits")["Schedule"])
    assert [(r["method"], r["steps"]) for r in rows] == [(m, 2) for m in METHODS]
    for row in rows:
        assert row["nfe"] == build_plan(schedule, row["method"], 2).model_calls
        assert row["num"] == 8 and f"| {row['method']} |" in text
    real, _ = accuracy_digits.real_digits()
    with np.load(tmp_path / "cache.npz") as cache:
        for row in rows:
            fd, entropy = independent_fd_and_entropy(cache[f"{row['method']}/2/0"], real)
            assert row["fd"] == pytest.approx(fd, rel=1e-6) and row["label_entropy"] == pytest.approx(entropy)
    drew = (tmp_path / "fd.png").exists()
    assert drew == (importlib.util.find_spec("matplotlib") is not None)  # the plot is optional, like every plot here
    assert not drew or (tmp_path / "fd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with np.load(tmp_path / "cache.npz") as cache:
        assert cache["DDIM/2/0"].shape == (8, 16, 16) and cache["DDIM/2/0"].dtype == np.uint8
        assert "F-PNDM/2/1" in cache.files  # the second seed of the spread row

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although every cell is cached")

    monkeypatch.setattr(accuracy_digits, "sample", no_sampling)
    again = accuracy_digits.main(argv[:3] + ["--num", "6"] + argv[5:], log=lambda *_: None)[1]
    assert [r["method"] for r in again] == list(METHODS)
    assert all(r["num"] == 6 for r in again)  # a prefix of the cached 8
