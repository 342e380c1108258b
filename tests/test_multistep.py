"""The multistep coefficients (pndm_fast/multistep.py) against op-by-op float64 reference samplers written from
the papers (pndm_fast/multistep_reference.py), on grids of raw noise levels; the quadrature against closed forms;
and the orders of convergence against the closed-form probability-flow ODE of Gaussian data."""

import math

import numpy as np
import pytest
import torch

from mixture import ring_2d
from multistep_run import run_steps

from pndm_fast import multistep as ms
from pndm_fast import multistep_reference as ref
from pndm_fast.errors import UserError
from pndm_fast.methods import METHODS

MU, STD = 0.5, 0.3  # Gaussian data x0 ~ N(MU, STD^2) elementwise
LAMBDA_END = 0.5 * math.log(0.91 / 0.09)  # sigma = 0.3: a level away from the data


def gaussian_eps(x, ac):
    alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
    return sigma * (x - alpha * MU) / (alpha**2 * STD**2 + sigma**2)


def gaussian_flow(x, ac_from, ac_to):
    """The probability-flow ODE's exact map for Gaussian data: the affine map between the marginals
    N(alpha mu, alpha^2 s^2 + sigma^2) (monotone in 1-d, so it is the flow)."""
    z = (x - math.sqrt(ac_from) * MU) / math.sqrt(ac_from * STD**2 + 1 - ac_from)
    return math.sqrt(ac_to) * MU + math.sqrt(ac_to * STD**2 + 1 - ac_to) * z


def lambda_grid(steps, lam_from, lam_to, to_data=False):
    lams = np.linspace(lam_from, lam_to, steps + 1)
    levels = list(1 / (1 + np.exp(-2 * lams)))
    return levels + [1.0] if to_data else levels


MIXTURE = ring_2d()


def mixture_eps(x, ac):
    flat = x.reshape(-1, 2)
    return MIXTURE.eps(flat, ac.expand(flat.shape[0]), (1 - ac).expand(flat.shape[0])).reshape(x.shape)


def on_levels(solver, x, grid, eps_fn, **options):
    """A reference solver of pndm_fast.multistep_reference run on raw levels: each level is its own "time"."""
    acs = [torch.tensor(float(a), dtype=torch.float64) for a in grid]
    return solver(eps_fn, x, acs, acs, **options)


# (name, coefficient function, reference sampler, prediction); the references return the states the model is
# called at
CASES = [
    ("dpm2m", lambda g, lof: ms.dpm_solver_pp(g, 2, lof),
     lambda x, g, f, lof: on_levels(ref.dpm_solver_pp, x, g, f, order=2, lower_order_final=lof), "x0"),
    ("dpm3m", lambda g, lof: ms.dpm_solver_pp(g, 3, lof),
     lambda x, g, f, lof: on_levels(ref.dpm_solver_pp, x, g, f, order=3, lower_order_final=lof), "x0"),
    *[(f"unipc-{v}-{p}", (lambda v, p: lambda g, lof: ms.unipc(g, p, v, lof))(v, p),
       (lambda v, p: lambda x, g, f, lof: on_levels(ref.unipc, x, g, f, variant=v, order=p,
                                                    lower_order_final=lof))(v, p), "x0")
      for v in ("bh1", "bh2") for p in (1, 2, 3)],
    *[(f"deis-{p}", (lambda p: lambda g, lof: ms.deis(g, p, lof))(p),
       (lambda p: lambda x, g, f, lof: on_levels(ref.eps_lagrange, x, g, f, order=p, basis="lambda",
                                                 lower_order_final=lof))(p), "eps")
      for p in (1, 2, 3, 4)],
    *[(f"pndm-exact-{b}-{p}", (lambda b, p: lambda g, lof: ms.pndm_exact(g, p, b, lof))(b, p),
       (lambda b, p: lambda x, g, f, lof: on_levels(ref.eps_lagrange, x, g, f, order=p, basis=b,
                                                    lower_order_final=lof))(b, p), "eps")
      for b in ("rho", "lambda") for p in (2, 3, 4)],
]


@pytest.mark.parametrize("to_data", [False, True])
@pytest.mark.parametrize("lof", [False, True])
@pytest.mark.parametrize("name,coefficients,reference,prediction", CASES, ids=[c[0] for c in CASES])
def test_coefficients_equal_the_reference_steps(name, coefficients, reference, prediction, lof, to_data):
    """On a nonuniform grid and the (nonlinear) ring mixture, every state agrees to 1e-12."""
    lams = np.concatenate([np.linspace(-3.5, 0.0, 5), np.linspace(0.4, 3.0, 4) ** 1.3])
    grid = list(1 / (1 + np.exp(-2 * lams))) + ([1.0] if to_data else [])
    x = torch.randn(5, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    theirs = reference(x, grid, mixture_eps, lof)
    ours, _ = run_steps(coefficients(grid, lof), x, grid, mixture_eps, prediction)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert float((a - b).norm() / b.norm()) < 1e-12, f"state {i}"


def test_log_sigma_basis_equals_its_reference_to_its_conditioning():
    """At the noisy end log sigma ~ -ac/2 crowds the nodes (weights of +-350 at lambda = -3), so rounding is
    amplified ~1e3 over the other bases: 1e-9 here."""
    grid = lambda_grid(10, -3.0, 2.0, to_data=True)
    x = torch.randn(5, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for p in (2, 3, 4):
        theirs = on_levels(ref.eps_lagrange, x, grid, mixture_eps, order=p, basis="log_sigma")
        ours, _ = run_steps(ms.pndm_exact(grid, p, "log_sigma"), x, grid, mixture_eps, "eps")
        for a, b in zip(ours, theirs):
            assert float((a - b).norm() / b.norm()) < 1e-9


def test_unipc_corrected_states_equal_the_reference():
    grid = lambda_grid(8, -3.0, 2.0, to_data=True)
    x = torch.randn(4, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for variant in ("bh1", "bh2"):
        _, theirs = on_levels(ref.unipc_states, x, grid, mixture_eps, variant=variant, order=3)
        _, ours = run_steps(ms.unipc(grid, 3, variant), x, grid, mixture_eps, "x0")
        assert len(ours) == len(theirs) == 9  # one per model call
        for a, b in zip(ours, theirs):
            assert float((a - b).norm() / b.norm()) < 1e-12


@pytest.mark.parametrize("basis", ["rho", "lambda"])
def test_quadrature_matches_the_closed_forms_to_1e_12(basis):
    """The composite Gauss-Legendre quadrature (used for the log-sigma basis) reproduces the closed-form weights of
    the rho and lambda bases, on short, long and infinite (to the data) steps."""
    grid = lambda_grid(12, -4.0, 3.0, to_data=True)
    levels = ms.levels_of(grid)
    closed = {"rho": ms._weights_rho, "lambda": ms._weights_lambda}[basis]
    of_log_rho = {"rho": np.exp, "lambda": np.negative}[basis]
    for i in range(3, len(levels) - 1):
        for p in (2, 3, 4):
            nodes = np.array([levels[i - j].rho if basis == "rho" else levels[i - j].lam for j in range(p)])
            u_to = -math.inf if levels[i + 1].rho == 0 else math.log(levels[i + 1].rho)
            quad = ms.quadrature_weights(nodes, of_log_rho, math.log(levels[i].rho), u_to)
            exact = closed(levels, i, p)
            assert np.abs(quad - exact).max() <= 1e-12 * np.abs(exact).max(), (i, p)


def test_lambda_weights_integrate_constants_and_lambda_itself():
    """Two closed forms the 2-point lambda basis must reproduce: int 1 d rho = rho_n - rho, and by parts
    int lambda d rho = lambda_n rho_n - lambda rho + (rho_n - rho) (rho = e^-lambda)."""
    levels = ms.levels_of(lambda_grid(6, -2.0, 1.0))
    i = 3
    w = ms._weights_lambda(levels, i, 2)
    a, n = levels[i], levels[i + 1]
    assert math.isclose(w.sum(), n.rho - a.rho, rel_tol=1e-13)
    exact = n.lam * n.rho - a.lam * a.rho + (n.rho - a.rho)
    assert math.isclose(w @ np.array([a.lam, levels[i - 1].lam]), exact, rel_tol=1e-12)


def test_x_minus_one_keeps_every_digit():
    """Near the data the x coefficient is 1 +- 1e-9: x_minus_one against 40-digit decimal arithmetic (the plain
    float64 subtraction keeps only ~7 of its digits)."""
    from decimal import Decimal, getcontext
    getcontext().prec = 40
    grid = [0.999999998, 0.999999999]
    a0, a1 = Decimal(grid[0]), Decimal(grid[1])
    eps_form = ms.deis(grid, 1)[0].updates["x_next"]
    assert eps_form.x_minus_one == pytest.approx(float((a1 / a0).sqrt() - 1), rel=1e-14)
    data_form = ms.dpm_solver_pp(grid, 1)[0].updates["x_next"]
    assert data_form.x_minus_one == pytest.approx(float(((1 - a1) / (1 - a0)).sqrt() - 1), rel=1e-14)
    for steps in (ms.unipc(lambda_grid(6, -2, 2), 3), ms.pndm_exact(lambda_grid(6, -2, 2), 4)):
        for step in steps:
            for update in step.updates.values():
                assert update.x_minus_one == pytest.approx(update.weights["x"] - 1, abs=1e-15)


def test_orders_ramp_up_and_lower_order_final():
    grid = lambda_grid(6, -2.0, 2.0)
    assert [s.order for s in ms.pndm_exact(grid, 4)] == [1, 2, 3, 4, 4, 4]
    assert [s.order for s in ms.deis(grid, 3)] == [1, 2, 3, 3, 2, 1]
    assert [s.order for s in ms.dpm_solver_pp(grid + [1.0], 3, lower_order_final=False)] == [1, 2, 3, 3, 3, 3, 1]
    unipc = ms.unipc(grid, 3)
    assert [s.order for s in unipc] == [1, 2, 3, 3, 2, 1]
    # the corrector of step i has the predictor order of step i - 1 plus the new point: UniPC-3 reads D0..D3
    assert [len(s.updates["x_next"].weights) - 1 for s in unipc] == [1, 2, 3, 4, 4, 3]


@pytest.mark.parametrize("bad", [[0.5], [0.2, 0.1], [0.0, 0.5], [0.1, 1.0, 1.0], [0.1, float("nan")], "ab"])
def test_bad_grids_are_one_line_user_errors(bad):
    with pytest.raises(UserError) as err:
        ms.deis(bad)
    assert "\n" not in str(err.value)


def test_bad_orders_and_options_are_user_errors():
    grid = lambda_grid(4, -1, 1)
    for call in (lambda: ms.dpm_solver_pp(grid, 4), lambda: ms.unipc(grid, 2, "bh3"),
                 lambda: ms.pndm_exact(grid, 5), lambda: ms.pndm_exact(grid, 2, "t"), lambda: ms.deis(grid, 2.0)):
        with pytest.raises(UserError):
            call()


def fitted_order(method, steps_list=(80, 160, 320, 640)):
    """Slope of log(global error) against log(steps) on lambda-uniform grids from lambda = -10 (where the
    first-order warm-up's error is e^-20 of the step's) to sigma = 0.3. 10-40 steps are pre-asymptotic here
    (slopes from 1.3 to 6, docs/multistep.md); at 640 steps the smallest error is 1e-8, far above rounding."""
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    errors = []
    for n in steps_list:
        grid = lambda_grid(n, -10.0, LAMBDA_END)
        coefficients, prediction = method(grid)
        out, _ = run_steps(coefficients, x, grid, gaussian_eps, prediction)
        errors.append(float((out[-1] - gaussian_flow(x, grid[0], grid[-1])).abs().max()))
    return -np.polyfit(np.log(steps_list), np.log(errors), 1)[0]


ORDER_CASES = [
    ("dpm2m", lambda g: (ms.dpm_solver_pp(g, 2, False), "x0"), 2),
    ("dpm3m-exact-third", lambda g: (ms.dpm_solver_pp(g, 3, False, exact_third=True), "x0"), 3),
    ("unipc-bh1-2", lambda g: (ms.unipc(g, 2, "bh1", False), "x0"), 3),  # UniC-p raises UniP-p's order by one
    ("unipc-bh1-3", lambda g: (ms.unipc(g, 3, "bh1", False), "x0"), 4),
    ("unipc-bh2-3", lambda g: (ms.unipc(g, 3, "bh2", False), "x0"), 4),
    ("deis-2", lambda g: (ms.deis(g, 2, False), "eps"), 2),
    ("deis-3", lambda g: (ms.deis(g, 3, False), "eps"), 3),
    ("pndm-exact-rho-3", lambda g: (ms.pndm_exact(g, 3, "rho"), "eps"), 3),
    ("pndm-exact-rho-4", lambda g: (ms.pndm_exact(g, 4, "rho"), "eps"), 4),
    ("pndm-exact-lambda-3", lambda g: (ms.pndm_exact(g, 3, "lambda"), "eps"), 3),
    ("first-order", lambda g: (ms.deis(g, 1), "eps"), 1),
]


@pytest.mark.parametrize("name,method,nominal", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_fitted_order_is_the_nominal_order(name, method, nominal):
    assert abs(fitted_order(method) - nominal) < 0.3


SLOW_ORDER_CASES = [
    # pre-asymptotic up to ~300 steps: slopes 3.0, 3.7, 3.9 per doubling from 80
    ("pndm-exact-lambda-4", lambda g: (ms.pndm_exact(g, 4, "lambda"), "eps"), 4),
    ("deis-4", lambda g: (ms.deis(g, 4, False), "eps"), 4),
    # its error changes sign near 200 steps: slopes 0.98, 2.30, 2.75, 2.89 per doubling from 160
    ("unipc-bh2-2", lambda g: (ms.unipc(g, 2, "bh2", False), "x0"), 3),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,method,nominal", SLOW_ORDER_CASES, ids=[c[0] for c in SLOW_ORDER_CASES])
def test_fitted_order_with_more_steps(name, method, nominal):
    assert abs(fitted_order(method, (640, 1280, 2560)) - nominal) < 0.3


def test_published_dpm_solver_pp_3m_is_second_order_in_the_limit():
    """The published 3M weights half of its quadratic term (pndm_fast/multistep.py, dpm_solver_pp): its error
    falls like steps^-2 at large step counts, not steps^-3."""
    order = fitted_order(lambda g: (ms.dpm_solver_pp(g, 3, False), "x0"), (640, 1280, 2560))
    assert abs(order - 2) < 0.3


@pytest.mark.parametrize("ac_end", [0.91, 0.9999])
def test_default_pndm_exact_basis_is_the_most_accurate_at_8_to_20_steps(ac_end):
    """The choice docs/multistep.md reports (scripts/multistep_accuracy.py): at order 4 on lambda-uniform grids from
    ac = 4e-5, the default basis has the smallest global error of the three at every step count from 8 to 20."""
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    lam_from, lam_to = 0.5 * math.log(4e-5 / (1 - 4e-5)), 0.5 * math.log(ac_end / (1 - ac_end))
    for n in (8, 10, 12, 15, 20):
        grid = lambda_grid(n, lam_from, lam_to)
        errors = {}
        for basis in ms.BASES:
            out, _ = run_steps(ms.pndm_exact(grid, 4, basis), x, grid, gaussian_eps, "eps")
            errors[basis] = float((out[-1] - gaussian_flow(x, grid[0], grid[-1])).abs().max())
        assert min(errors, key=errors.get) == METHODS["PNDM-exact"].settings["basis"], (n, errors)
