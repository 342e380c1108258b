"""`--runner fid`: the whole pipeline (folder -> features -> stats file -> FID) with the digits classifier standing
in for Inception, the exact message when pytorch-fid or its weights are missing, and one-line errors for bad input.

pytorch-fid needs torchvision, which does not import beside the torch installed here, so the Inception network
itself never runs in these tests; a stand-in module shaped like pytorch_fid.inception checks how it is driven.
"""

import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pndm_fast import cli
from digits_classifier import load_classifier
from pndm_fast.errors import UserError
from pndm_fast.frechet import frechet_distance, statistics
from pndm_fast.images import to_uint8, write_png_atomic
from pndm_fast.runners import fid


class DigitsFeatures:
    """Stand-in extractor: grey images, resized to 16x16, through the digits classifier's 64-d features."""

    mode = "L"

    def __init__(self):
        self.net = load_classifier()

    @torch.inference_mode()
    def __call__(self, images):
        if images.shape[-2:] != (16, 16):
            images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
        return self.net.features(images)


@pytest.fixture(scope="module")
def digits_uint8():
    """(1797, 16, 16, 1) uint8 real digits, as PNG files hold them."""
    from pndm_fast.data import load_digits

    return to_uint8(load_digits(16, 1).images * 2 - 1)


def write_folder(path, pixels):
    path.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(pixels):
        write_png_atomic(image, str(path / f"{i:06d}.png"))
    return path


def direct_features(pixels) -> np.ndarray:
    """Features straight from the uint8 arrays, never through files: the independent route."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    with torch.inference_mode():
        return load_classifier().features(x).double().numpy()


def run_cli(capsys, *args):
    code = cli.main(["--runner", "fid", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    assert err.startswith("pndm-fast: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_pipeline_stats_file_and_fid_match_the_direct_computation(tmp_path, digits_uint8, capsys):
    real, fake = digits_uint8[:120], digits_uint8[600:680]
    real_dir, fake_dir = write_folder(tmp_path / "real", real), write_folder(tmp_path / "fake", fake)
    stats = tmp_path / "stats" / "real.npz"
    assert fid.run_fid(str(real_dir), str(stats), make_stats=True, batch_size=7, extractor=DigitsFeatures()) == 0
    with np.load(stats) as data:
        mu, sigma = data["mu"], data["sigma"]
    mu_ref, sigma_ref = statistics(direct_features(real))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-6)
    assert "wrote FID statistics" in capsys.readouterr().out

    assert fid.run_fid(str(fake_dir), str(stats), batch_size=50, extractor=DigitsFeatures()) == 0
    printed = float(capsys.readouterr().out.split()[1])
    expected = frechet_distance(*statistics(direct_features(fake)), mu_ref, sigma_ref)
    assert printed == pytest.approx(expected, rel=1e-3)
    assert expected > 0
    # the same folder against its own statistics: zero up to the 4 printed decimals
    fid.run_fid(str(real_dir), str(stats), extractor=DigitsFeatures())
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(0.0, abs=1e-3)


def test_batches_split_at_size_changes(tmp_path, digits_uint8):
    # pytorch-fid stacks a whole batch and so needs one image size; a change of size starts a new batch here.
    folder = write_folder(tmp_path / "mixed", digits_uint8[:5])
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.kron(digits_uint8[10 + i, :, :, 0], np.ones((2, 2), np.uint8)), "L").save(
            folder / f"big{i}.png")
    seen = []

    class Recording(DigitsFeatures):
        def __call__(self, images):
            seen.append(tuple(images.shape))
            return super().__call__(images)

    feats = fid.folder_features(str(folder), Recording(), batch_size=4)
    assert feats.shape == (8, 64)
    assert seen == [(4, 1, 16, 16), (1, 1, 16, 16), (3, 1, 32, 32)]  # sorted names: 000000.. before big..


def test_cli_runs_the_pipeline_with_the_extractor_swapped_in(tmp_path, digits_uint8, capsys, monkeypatch):
    monkeypatch.setattr(fid, "InceptionFeatures", lambda device: DigitsFeatures())
    real_dir = write_folder(tmp_path / "real", digits_uint8[:40])
    fake_dir = write_folder(tmp_path / "fake", digits_uint8[900:940])
    stats = tmp_path / "real.npz"
    code, out, err = run_cli(capsys, "--image_path", real_dir, "--fid_stats", stats, "--make_stats", "--device", "cpu")
    assert (code, err) == (0, "") and stats.is_file()
    code, out, err = run_cli(capsys, "--image_path", fake_dir, "--fid_stats", stats, "--batch_size", "16")
    assert code == 0 and out.startswith("FID ")
    expected = frechet_distance(*statistics(direct_features(digits_uint8[900:940])),
                                *statistics(direct_features(digits_uint8[:40])))
    assert float(out.split()[1]) == pytest.approx(expected, rel=1e-3)


def test_missing_pytorch_fid_says_what_to_install_and_where_the_weights_go(tmp_path, digits_uint8, capsys,
                                                                         monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_fid", None)  # import fails, whether or not it is installed
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    folder = write_folder(tmp_path / "imgs", digits_uint8[:3])
    code, _, err = run_cli(capsys, "--image_path", folder, "--fid_stats", tmp_path / "s.npz", "--make_stats")
    weights = hub / "checkpoints" / fid.FID_WEIGHTS
    assert_one_line_error(code, err, "pip install pytorch-fid", "torchvision", fid.FID_WEIGHTS_URL, str(weights))
    assert not (tmp_path / "s.npz").exists()


def fake_pytorch_fid(calls: list) -> types.ModuleType:
    """A module shaped like pytorch_fid.inception: InceptionV3's constructor fetches its weights through the module's
    load_state_dict_from_url (as fid_inception_v3 does), forward returns [pool3 (B, 2048, 1, 1)]."""
    inception = types.ModuleType("pytorch_fid.inception")

    def download(url, *args, **kwargs):
        raise AssertionError(f"would download {url}")

    class InceptionV3(torch.nn.Module):
        BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}

        def __init__(self, output_blocks):
            super().__init__()
            calls.append(("blocks", list(output_blocks)))
            state = inception.load_state_dict_from_url("https://example.invalid/" + fid.FID_WEIGHTS)
            self.proj = torch.nn.Parameter(state["proj"])

        def forward(self, x):
            calls.append(("input", tuple(x.shape), float(x.min()), float(x.max())))
            return [(x.mean((2, 3)) @ self.proj)[:, :, None, None]]

    inception.InceptionV3, inception.load_state_dict_from_url = InceptionV3, download
    package = types.ModuleType("pytorch_fid")
    package.inception = inception
    return package


def test_inception_path_reads_only_the_local_weights(tmp_path, digits_uint8, capsys, monkeypatch):
    calls = []
    package = fake_pytorch_fid(calls)
    monkeypatch.setitem(sys.modules, "pytorch_fid", package)
    monkeypatch.setitem(sys.modules, "pytorch_fid.inception", package.inception)
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    folder = write_folder(tmp_path / "imgs", digits_uint8[:6])
    stats = tmp_path / "s.npz"

    code, _, err = run_cli(capsys, "--image_path", folder, "--fid_stats", stats, "--make_stats")
    assert_one_line_error(code, err, f"download {fid.FID_WEIGHTS_URL} to {hub / 'checkpoints' / fid.FID_WEIGHTS}")
    assert "pip install" not in err and calls == []

    proj = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0))
    (hub / "checkpoints").mkdir(parents=True)
    torch.save({"proj": proj}, hub / "checkpoints" / fid.FID_WEIGHTS)
    code, _, err = run_cli(capsys, "--image_path", folder, "--fid_stats", stats, "--make_stats", "--batch_size", "4")
    assert (code, err) == (0, "")
    assert calls[0] == ("blocks", [3])
    # RGB in [0, 1] at the files' own size: pytorch-fid resizes to 299 inside the network
    assert [c[1] for c in calls[1:]] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert all(0.0 <= c[2] and c[3] <= 1.0 for c in calls[1:])
    x = torch.from_numpy(digits_uint8[:6]).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 255.0
    mu_ref, sigma_ref = statistics((x.mean((2, 3)) @ proj).double())
    with np.load(stats) as data:
        # float32 features summed in another order (another CPU's blocking): entries near zero differ by ~1e-9
        np.testing.assert_allclose(data["mu"], mu_ref, rtol=1e-5, atol=1e-7 * np.abs(mu_ref).max())
        # features are float32: entries that cancel to near zero carry rounding of the matrix's scale, not their own
        np.testing.assert_allclose(data["sigma"], sigma_ref, rtol=1e-4, atol=1e-5 * np.abs(sigma_ref).max())

    torch.save({"proj": types.SimpleNamespace}, hub / "checkpoints" / fid.FID_WEIGHTS)  # a pickled class
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        fid.InceptionFeatures("cpu")


@pytest.mark.parametrize("case", ["empty", "missing", "one image", "unreadable", "no stats", "not npz",
                                  "no sigma", "wrong shape", "other dimension", "no --fid_stats"])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, digits_uint8, capsys, monkeypatch, case):
    monkeypatch.setattr(fid, "InceptionFeatures", lambda device: DigitsFeatures())
    folder = tmp_path / "imgs"
    folder.mkdir()
    stats = tmp_path / "stats.npz"
    if case not in ("empty", "one image", "missing"):
        write_folder(folder, digits_uint8[:4])
    if case == "one image":
        write_folder(folder, digits_uint8[:1])
    if case == "missing":
        folder = tmp_path / "nowhere"
    if case == "unreadable":
        (folder / "000002.png").write_bytes(b"not a png at all")
    if case == "not npz":
        stats.write_text("mu, sigma\n")
    if case == "no sigma":
        np.savez(stats, mu=np.zeros(64))
    if case == "wrong shape":
        np.savez(stats, mu=np.zeros(64), sigma=np.eye(63))
    if case == "other dimension":
        np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    args = ["--image_path", folder] + ([] if case == "no --fid_stats" else ["--fid_stats", stats])
    if case == "unreadable":  # reached while computing features, so ask for statistics: none to read first
        args.append("--make_stats")
    code, out, err = run_cli(capsys, *args)
    expected = {"empty": "no images", "missing": "does not exist", "one image": "only 1 image",
                "unreadable": "cannot read image", "no stats": "--make_stats", "not npz": "could not be read",
                "no sigma": "could not be read", "wrong shape": "expected finite mu", "other dimension": "64-d",
                "no --fid_stats": "needs --fid_stats"}[case]
    assert_one_line_error(code, err, expected)
    assert out == ""


def test_make_stats_leaves_no_file_when_an_image_is_bad(tmp_path, digits_uint8):
    folder = write_folder(tmp_path / "imgs", digits_uint8[:3])
    (folder / "000001.png").write_bytes(b"\x89PNG truncated")
    stats = tmp_path / "stats.npz"
    with pytest.raises(UserError, match="000001.png"):
        fid.run_fid(str(folder), str(stats), make_stats=True, extractor=DigitsFeatures())
    assert list(tmp_path.iterdir()) == [folder]
