"""The soak and accuracy scripts run end to end in their smallest modes, so that none of them rots."""

import accuracy_mixture
import pytest
import soak
import torch

from pndm_fast import Denoiser, Schedule, sample, set_cache_limit
from pndm_fast.methods import METHODS
from pndm_fast.sampling import cached_runner_count


@pytest.fixture(autouse=True)
def default_cache_limit():
    """soak.py sets the runner cache limit for its run; the next tests get the default back."""
    yield
    set_cache_limit(None)


def test_soak_keeps_the_cache_within_its_limit(one_thread, tmp_path):
    """Counted over the soak's own two networks: another live model's runners (a fixture of a test that ran before
    in this process, as under pytest-xdist) are not the soak's (planted: counting every model's fails)."""
    other = lambda x, t: x  # noqa: E731
    sample(other, torch.zeros(1, 1, 2, 2), Schedule.from_config(soak.SCHEDULE), "DDIM", 2, "torch")
    assert cached_runner_count(other) == cached_runner_count(Denoiser(other)) == 1
    row = soak.main(["--quick", "--rounds", "1", "--steps", "1", "--cache", "2", "--threads", "1", "--device",
                     "cpu", "--json", str(tmp_path / "soak.json")])
    assert row["cache_limit"] == 2 and 0 < row["most_cached_runners"] <= 2 * 2  # two models, two runners each
    assert row["batches"] == 2 * row["distinct_keys"] and (tmp_path / "soak.json").exists()


def test_mixture_study_smoke_mode_measures_discretisation_errors(one_thread, tmp_path):
    """The errors are the methods' own: DDIM's falls like 1 / steps (first order) and F-PNDM's at 20 steps is far
    below DDIM's (planted: an error taken against the run's own state at t = 0 instead of the exact ODE's at
    t = 200 fails both)."""
    text, rows = accuracy_mixture.main(["--smoke", "--out", str(tmp_path)])
    errors = [row for row in rows if row["kind"] == "error"]
    assert set(METHODS) <= {row["method"] for row in errors} and "DDIM" in text
    for mixture in {row["mixture"] for row in errors}:
        err = {(row["method"], row["steps"]): row["err_sampler_t200"] for row in errors if row["mixture"] == mixture}
        assert err["DDIM", 5] > err["DDIM", 10] > err["DDIM", 20], mixture
        assert 1.5 < err["DDIM", 10] / err["DDIM", 20] < 2.5, mixture
        assert err["F-PNDM", 20] < err["DDIM", 20] / 5, mixture
    assert (tmp_path / "accuracy_mixture.json").exists()
