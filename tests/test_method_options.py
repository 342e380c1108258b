"""Method options ("DEIS:order=4", "UniPC-bh2:order=2,lower_order_final=false"): each configured method runs on
every backend as its float64 whole-run reference (written from its paper) says, its plan uses the coefficients the
peer tests check against diffusers, and the options change what they say and nothing else."""

import pytest
import torch

from pndm_fast import UserError, sample
from pndm_fast import multistep as ms
from pndm_fast.grids import make_grid
from pndm_fast.methods import METHODS, build_plan, method_record
from mixture import MixtureEps, ring_2d
from multistep_run import run_steps
from pndm_fast.schedule import Schedule

LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
VARIANTS = ["DEIS:order=2", "DEIS:order=4", "DEIS:lower_order_final=false", "UniPC-bh1:order=2",
            "UniPC-bh2:order=2", "UniPC-bh2:lower_order_final=false", "DPM-Solver++3M:lower_order_final=false",
            "PNDM-exact:order=1", "PNDM-exact:order=2", "PNDM-exact:order=3", "PNDM-exact:lower_order_final=true"]
GRIDS = [("logsnr", "zero"), ("karras", "min"), ((0, 40.5, 200, 600, 999), "zero")]


@pytest.fixture(scope="module")
def problem():
    mixture = ring_2d()
    noise = torch.randn(8, *mixture.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return MixtureEps(mixture, LINEAR), noise


@pytest.mark.parametrize("timesteps,end", GRIDS, ids=[str(g[0])[:9] for g in GRIDS])
@pytest.mark.parametrize("method", VARIANTS)
def test_every_variant_runs_as_its_reference_says(problem, method, timesteps, end):
    model, noise = problem
    options = dict(timesteps=timesteps, end=end)
    truth = sample(model, noise, LINEAR, method, 7, "reference", True, **options)
    for backend in ("fused", "torch"):
        ours = sample(model, noise, LINEAR, method, 7, backend, True, **options)
        for step in range(1, len(truth)):
            rel = float((ours[step] - truth[step]).norm() / truth[step].norm())
            assert rel < 1e-12, (backend, step, rel)


@pytest.mark.parametrize("method,coefficients,kind", [
    ("DEIS:order=2", lambda acs: ms.deis(acs, 2), "deis"),
    ("DEIS:order=3,lower_order_final=false", lambda acs: ms.deis(acs, 3, lower_order_final=False), "deis"),
    ("UniPC-bh1:order=2", lambda acs: ms.unipc(acs, 2, "bh1"), "unipc"),
    ("UniPC-bh2:order=2", lambda acs: ms.unipc(acs, 2, "bh2"), "unipc"),
    ("DPM-Solver++3M:lower_order_final=false", lambda acs: ms.dpm_solver_pp(acs, 3, lower_order_final=False),
     "dpm_solver_pp"),
])
def test_the_plan_uses_the_coefficients_the_peer_tests_check(problem, method, coefficients, kind):
    """tests/test_peers_diffusers.py checks these coefficient functions against diffusers' schedulers; the plan
    of the option's spelling must run exactly them."""
    model, noise = problem
    grid = make_grid(LINEAR, "logsnr", 8, "zero")
    acs = [grid.level(t) for t in grid.times]
    time_of = dict(zip(acs, grid.times))

    def eps_fn(x, ac):  # a float64 model is given its times in float64, as the engine gives them
        return model(x, torch.full((x.shape[0],), time_of[float(ac)], dtype=torch.float64))

    prediction = {"unipc": "x0", "dpm_solver_pp": "x0"}.get(kind, "eps")
    theirs, _ = run_steps(coefficients(acs), noise, acs, eps_fn, prediction)
    ours = sample(model, noise, LINEAR, method, 8, "fused", True, timesteps="logsnr", end="zero")
    assert len(theirs) == len(ours)
    for i, (a, b) in enumerate(zip(theirs, ours)):
        assert float((a - b).norm() / b.norm()) < 1e-12, i


def test_lower_order_final_changes_only_the_last_steps(problem):
    """With order 3, lower-order final steps change the last two steps' weights only: the states before them are
    the same numbers, the final states differ."""
    model, noise = problem
    on = sample(model, noise, LINEAR, "DEIS", 10, "fused", True, timesteps="logsnr")
    off = sample(model, noise, LINEAR, "DEIS:lower_order_final=false", 10, "fused", True, timesteps="logsnr")
    assert torch.equal(on[:-2], off[:-2])
    assert not torch.allclose(on[-1], off[-1], rtol=0, atol=1e-9)


def test_names_are_canonical_and_defaults_are_the_plain_method():
    assert method_record("DEIS:order=3,lower_order_final=true") is METHODS["DEIS"]
    record = method_record("UniPC-bh2:lower_order_final=FALSE,order=2")
    assert record.name == "UniPC-bh2:order=2,lower_order_final=false" and record.order == 2
    assert method_record("PNDM-exact:order=2").order == 2 and METHODS["PNDM-exact"].order == 4
    plan = build_plan(LINEAR, "DEIS:order=4", 6)
    assert plan.method == "DEIS:order=4" and len(plan.buffers) == 1 + 4  # x and four eps of history


@pytest.mark.parametrize("bad,match", [
    ("DEIS:order=5", "not one of 3, 2, 4"), ("DEIS:order=two", "is not one of 3, 2, 4"),
    ("DDIM:order=2", "DDIM has no option 'order': it takes eta"), ("DEIS:order", "key=value"),
    ("F-PNDM:order=2", "F-PNDM has no option 'order': it takes no options"),
    ("DEIS:order=2,order=3", "each key once"), ("UniPC-bh1:order=4", "not one of 3, 2"), ("Deis", "unknown method"),
])
def test_a_bad_option_is_one_line(bad, match):
    with pytest.raises(UserError, match=match) as info:
        method_record(bad)
    assert "\n" not in str(info.value)
