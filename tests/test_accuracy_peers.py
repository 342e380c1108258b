"""The side-by-side study (benchmarks/accuracy_peers.py): its exact solve against the closed-form flow of Gaussian
data, its diffusers harness against pndm_fast's DDIM on the same levels, its call counts, and its quick mode end to
end (the JSON, the page section and the auto table it writes)."""

import ast
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import accuracy_peers as ap  # noqa: E402

from pndm_fast import Schedule, load_config  # noqa: E402
from mixture import GaussianMixture  # noqa: E402

MU, STD = 0.3, 0.4  # one Gaussian component: the flow is affine in closed form


@pytest.fixture(scope="module")
def schedule():
    return Schedule.from_config(load_config("ddim-cifar10")["Schedule"])


def gaussian():
    return GaussianMixture.create([1.0], [[MU, -MU]], [STD], (2, 1, 1))


def closed_form(noise, sigma0, sigma1):
    """x at sigma1 from x = noise at sigma0: y = x sqrt(1 + sigma^2) moves as y - MU ~ sqrt(STD^2 + sigma^2)."""
    mu = torch.tensor([MU, -MU], dtype=torch.float64)
    y0 = noise * math.sqrt(1 + sigma0**2)
    y1 = mu + (y0 - mu) * math.sqrt(STD**2 + sigma1**2) / math.sqrt(STD**2 + sigma0**2)
    return y1 / math.sqrt(1 + sigma1**2)


def test_exact_flow_matches_the_closed_form_down_to_sigma_zero():
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = ap.exact_flow(gaussian(), noise, 150.0, [0.0, 0.01, 2.0])
    for sigma1 in (0.0, 0.01, 2.0):
        truth = closed_form(noise, 150.0, sigma1)
        assert ap.relative_error(out[sigma1], truth) < 1e-9, sigma1


def test_relative_error_is_the_mean_of_per_sample_relative_norms():
    truth = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    x = truth + torch.tensor([[0.5, 0.0], [0.0, 0.2]], dtype=torch.float64)
    assert ap.relative_error(x, truth) == pytest.approx((0.5 / 5 + 0.2 / 1) / 2, rel=1e-15)


def test_grid_bounds_place_the_first_and_last_calls_at_the_asked_sigmas(schedule):
    found = ap.steps_within(schedule, "DPM-Solver++2M", 8, "logsnr", 20.0, 0.1)
    steps, grid, calls = found
    assert calls == 8 and steps == 8
    assert ap.sigma_of(grid.level(grid.times[0])) == pytest.approx(20.0, rel=1e-9)
    assert ap.sigma_of(grid.level(grid.times[-2])) == pytest.approx(0.1, rel=1e-9)
    assert grid.times[-1] == -1.0 and grid.level(-1.0) == 1.0  # then the step to the data


def test_budget_counts_warm_up_calls(schedule):
    # F-PNDM's three Runge-Kutta steps cost 4 calls each: 12 calls for 3 steps, 13 for 4
    assert ap.steps_within(schedule, "F-PNDM", 12, "logsnr")[::2] == (3, 12)
    assert ap.steps_within(schedule, "F-PNDM", 13, "logsnr")[::2] == (4, 13)
    assert ap.steps_within(schedule, "S-PNDM", 5, "logsnr")[::2] == (4, 5)


diffusers_only = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@diffusers_only
def test_diffusers_ddim_through_the_harness_is_the_ddim_step_on_its_levels():
    diffusers = pytest.importorskip("diffusers", exc_type=ImportError)
    mixture = gaussian()
    noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cls_name, kwargs = ap.peer_configs()["DDIM"]
    x, start, end, calls = ap.run_peer(cls_name, kwargs, 6, noise, ap.mixture_eps_fn(mixture))
    # DDIM's "leading" timesteps k * (1000 // 6), read at its own float32 table, then the data (docs/peers.md)
    table = diffusers.DDIMScheduler(**kwargs).alphas_cumprod.double()
    levels = [float(table[k * (1000 // 6)]) for k in range(5, -1, -1)] + [1.0]
    assert calls == 6 and end == 1.0 and start == levels[0]
    ours = noise.clone()
    for a, a_next in zip(levels, levels[1:]):  # x' = sqrt(a') x0_hat + sqrt(1 - a') eps, written out
        eps = mixture.eps(ours, torch.full((4,), a, dtype=torch.float64))
        x0 = (ours - math.sqrt(1 - a) * eps) / math.sqrt(a)
        ours = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    assert ap.relative_error(x, ours) < 1e-12


@diffusers_only
def test_heun_calls_count_both_stages():
    pytest.importorskip("diffusers", exc_type=ImportError)
    cls_name, kwargs = ap.peer_configs()["Heun karras"]
    assert ap.peer_steps_within(cls_name, kwargs, 10) == (5, 9)  # 2 S - 1 calls: no second stage on the last


def test_quick_study_writes_rows_a_page_section_and_a_table(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n\nearlier text\n")
    auto_copy = tmp_path / "auto.py"
    auto_copy.write_text(ap.AUTO.read_text())
    monkeypatch.setattr(ap, "AUTO", auto_copy)
    try:
        data = ap.main(["--quick", "--no-digits", "--mixtures", "ring-2d", "--json", str(tmp_path / "r.json"),
                        "--doc", str(doc)], log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    rows = data["rows"]
    assert {r["budget"] for r in rows} == set(ap.CALLS["quick"])
    assert all(r["calls"] <= r["budget"] for r in rows)
    # every error is finite and the best is a real approximation (below the size of x itself)
    assert all(0 < ap.best(rows, "ring-2d", "pndm_fast", b)["err_common"] < 1 for b in ap.CALLS["quick"])
    text = doc.read_text()
    assert text.startswith("# Page\n\nearlier text\n") and text.count(ap.DOC_BEGIN) == 1
    # the table written parses back and holds, per budget, the most accurate pndm_fast row among the grids that
    # start at the noisiest level (one tuned mixture here: the least worst ratio is the least error)
    table = ast.literal_eval(auto_copy.read_text().split("TABLE = ", 1)[1].split("\n# END TABLE")[0])
    assert sorted(table) == sorted(ap.CALLS["quick"])
    for b, (method, spacing, s0, s1) in table.items():
        top = min((r for r in rows if r["side"] == "pndm_fast" and r["budget"] == b and r["sigma_start"] is None),
                  key=lambda r: r["err_common"])
        assert (method, spacing, s0, s1) == (top["name"], top["spacing"], top["sigma_start"], top["sigma_last"])
    # --reuse rebuilds the section in place: still one section, earlier text kept
    ap.main(["--reuse", "--json", str(tmp_path / "r.json"), "--doc", str(doc)], log=lambda _: None)
    again = doc.read_text()
    assert again.count(ap.DOC_BEGIN) == 1 and again.startswith("# Page\n\nearlier text\n")


def test_auto_takes_the_configuration_that_loses_least_where_it_suits_worse(monkeypatch):
    """Per budget, the smallest worst ratio to each tuned mixture's best: A is best on m1 and 2.7x off on m2, B is
    1.5x off on m1 and best on m2, so B (worst ratio 1.5) beats A (2.7); a grid that starts below the noisiest
    level (C, best on both) is not auto's to take, and a configuration measured on one mixture only (D) is not
    either, nor does it set that mixture's best."""
    monkeypatch.setattr(ap, "TUNED", ("m1", "m2"))

    def row(mixture, name, err, start=None):
        return {"mixture": mixture, "side": "pndm_fast", "budget": 6, "name": name, "spacing": "logsnr",
                "sigma_start": start, "sigma_last": None, "err_common": err}

    rows = [row("m1", "A", 1.0), row("m2", "A", 4.0), row("m1", "B", 1.5), row("m2", "B", 1.5),
            row("m1", "C", 0.1, 20.0), row("m2", "C", 0.1, 20.0), row("m1", "D", 0.5)]
    assert ap.auto_table(rows, [6]) == {6: ("B", "logsnr", None, None)}
    assert ap.auto_table(rows, [6], restrict=False) == {6: ("C", "logsnr", 20.0, None)}
