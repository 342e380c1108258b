"""Extending the engine is one place each, as docs/design.md shows: its code blocks for a new grid, a new solver and
a new prediction run here as written, and what they add works on every backend against its own reference. Also
the public surface: a Plan given whole, the top-level names, and no import cycles in the package."""

import ast
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mixture import GaussianMixture, MixtureEps, ring_2d

import pndm_fast
from pndm_fast import Denoiser, Method, Plan, Schedule, UserError, build_plan, make_grid, register_method, sample
from pndm_fast.cli import parse_timesteps
from pndm_fast.continuous import EDMSchedule
from pndm_fast.grids import GRIDS
from pndm_fast.levels import PREDICTIONS
from pndm_fast.methods import METHODS, _record, method_record
from pndm_fast.plans import EPS, STATE, Lin, ModelCall, Ring, var
from pndm_fast.reference import grid_level
from pndm_fast.reference import transfer as transfer_op
from pndm_fast.solvers import transfer

REPO = Path(__file__).resolve().parent.parent
LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})


def doc_block(heading: str) -> str:
    """The first python block under `heading` in docs/design.md."""
    text = (REPO / "docs" / "design.md").read_text()
    after = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", after, re.S)[1]


@pytest.fixture
def registry_restored():
    """Whatever a test adds to the registries is taken out again."""
    methods, grids, predictions = dict(METHODS), dict(GRIDS), dict(PREDICTIONS)
    yield
    for table, saved in ((METHODS, methods), (GRIDS, grids), (PREDICTIONS, predictions)):
        table.clear()
        table.update(saved)
    _record.cache_clear()


@pytest.fixture(scope="module")
def ring():
    mixture = ring_2d()
    noise = torch.randn(6, *mixture.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return MixtureEps(mixture, LINEAR), noise


def assert_states_agree(ours, truth, tol=1e-12):
    assert len(ours) == len(truth)
    for step in range(1, len(truth)):
        rel = float((ours[step] - truth[step]).norm() / truth[step].norm())
        assert rel < tol, (step, rel)


def test_the_documented_grid_is_one_function(registry_restored, ring):
    exec(doc_block("### Adding a grid"), {})
    grid = make_grid(LINEAR, "cosine", 6, "min")
    u = np.linspace(0, 1, 7)
    assert np.allclose(grid.times, 999 * (1 + np.cos(np.pi * u)) / 2, atol=1e-9)
    assert parse_timesteps("cosine") == "cosine"
    model, noise = ring
    truth = sample(model, noise, LINEAR, "DDIM", 6, "reference", True, timesteps="cosine", end="min")
    assert_states_agree(sample(model, noise, LINEAR, "DDIM", 6, "fused", True, timesteps="cosine", end="min"), truth)


def gaussian_flow(x, mu, std, a_from, a_to):
    """The probability-flow ODE's exact map for Gaussian data N(mu, std^2): affine between the marginals."""
    z = (x - math.sqrt(a_from) * mu) / math.sqrt(a_from * std**2 + 1 - a_from)
    return math.sqrt(a_to) * mu + math.sqrt(a_to * std**2 + 1 - a_to) * z


def test_the_documented_schedule_runs_as_edms_at_the_same_levels():
    """TrigFlow, added as design.md writes it, with an exact v network (Gaussian data): its logsnr grid has EDM's
    levels, and a run on it ends where the run on EDM's schedule does with an exact x0 network (each reading its own
    state and time), and its fused plan agrees with its reference."""
    namespace = {}
    exec(doc_block("### Adding a schedule"), namespace)
    trig, edm = namespace["TrigFlow"](), EDMSchedule()
    mu, std = 0.4, 0.5

    def posterior(x, alpha, sigma):  # (E[eps | x], E[x0 | x]) for x = alpha x0 + sigma eps
        z = (x - alpha * mu) / (alpha**2 * std**2 + sigma**2)
        return sigma * z, mu + alpha * std**2 * z

    def v_net(x, t):  # reads x_t = cos(t) x0 + sin(t) eps at its own t
        eps, x0 = posterior(x, math.cos(float(t[0])), math.sin(float(t[0])))
        return math.cos(float(t[0])) * eps - math.sin(float(t[0])) * x0

    def x0_net(x, sigma):  # reads the VE state x0 + sigma eps at sigma
        return posterior(x, 1.0, float(sigma[0]))[1]

    levels = [[schedule.alpha(t) for t in make_grid(schedule, "logsnr", 8).times] for schedule in (trig, edm)]
    assert np.allclose(*levels, rtol=1e-12, atol=0)
    noise = torch.randn(3, 2, 4, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = sample(Denoiser(v_net, "v"), noise, trig, "DPM-Solver++2M", 8, "fused", True, timesteps="logsnr")
    truth = sample(Denoiser(v_net, "v"), noise, trig, "DPM-Solver++2M", 8, "reference", True, timesteps="logsnr")
    assert_states_agree(ours, truth)
    at_edm = sample(Denoiser(x0_net, "x0"), noise, edm, "DPM-Solver++2M", 8, "fused", timesteps="logsnr")
    assert float((ours[-1] - at_edm).norm() / at_edm.norm()) < 1e-12


def test_the_documented_solver_runs_everywhere_as_its_reference_says_at_its_order(registry_restored, ring):
    exec(doc_block("### Adding a solver"), {})
    record = method_record("Trapezoid")
    assert "Trapezoid" in METHODS and record.plan(make_grid(LINEAR, "logsnr", 5, "min")).model_calls == 10
    model, noise = ring
    options = dict(timesteps="logsnr", end="min")
    truth = sample(model, noise, LINEAR, "Trapezoid", 7, "reference", True, **options)
    for backend in ("torch", "fused"):
        assert_states_agree(sample(model, noise, LINEAR, "Trapezoid", 7, backend, True, **options), truth)
    # its order, against the exact flow of Gaussian data: halving the step divides the error by about 4
    mu, std = 0.3, 0.5
    gaussian = GaussianMixture.create([1.0], [[mu]], [[std]], (1, 1, 1))
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1, 1, 1)
    errors = []
    for steps in (20, 40, 80):
        grid = make_grid(LINEAR, "logsnr", steps, "min")
        out = sample(MixtureEps(gaussian, LINEAR), x, LINEAR, "Trapezoid", backend="fused", timesteps=grid)
        exact = gaussian_flow(x, mu, std, grid.level(grid.times[0]), grid.level(grid.times[-1]))
        errors.append(float((out - exact).abs().max()))
    slopes = -np.diff(np.log(errors)) / math.log(2)
    assert np.all(np.abs(slopes - 2) < 0.3), slopes
    # a budget of model calls fits it too: 9 calls of two per step is 4 steps
    assert sample(model, noise, LINEAR, "Trapezoid", model_calls=9, backend="torch", timesteps="logsnr",
                  end="min").shape == noise.shape


def adams_bashforth_plan(grid, order=2):
    """The transfer step with the Adams-Bashforth mean of the last `order` eps (the first step first order)."""
    ring, steps = Ring("h", order), []
    weights = {1: (1.0,), 2: (1.5, -0.5)}
    for t, t_next in grid.pairs:
        new = ring.push()
        w = weights[len(ring)]
        e = w[0] * var(ring[-1]) + (w[1] * var(ring[-2]) if len(w) > 1 else 0.0 * var(ring[-1]))
        steps.append((ModelCall("x", t, new), Lin("x", transfer(grid, t, t_next, var("x"), e))))
    return Plan("AB", tuple(steps), (("x", STATE),) + tuple((n, EPS) for n in ring.names), grid.times, grid.name)


def adams_bashforth_reference(m, x, grid, order=2):
    level, xs, history = grid_level(grid, x), [x], []
    for t, t_next in grid.pairs:
        history.append(m(xs[-1], t))
        e = history[-1] if order == 1 or len(history) == 1 else 1.5 * history[-1] - 0.5 * history[-2]
        xs.append(transfer_op(xs[-1], t, t_next, e, level))
    return xs


def test_options_work_on_any_method_with_a_reference(registry_restored, ring):
    """Options reach the builder and the reference of any method (planted: binding them only to the multistep
    solvers' references, which raised TypeError for a method like this one)."""
    register_method(Method("AB", adams_bashforth_plan, adams_bashforth_reference, 2, "Adams-Bashforth eps",
                           options={"order": (2, 1)}))
    model, noise = ring
    options = dict(timesteps="karras", end="min")
    first = sample(model, noise, LINEAR, "AB:order=1", 6, "reference", True, **options)
    # order 1 is DDIM, computed by another builder and another reference
    assert_states_agree(first, sample(model, noise, LINEAR, "DDIM", 6, "reference", True, **options))
    assert_states_agree(sample(model, noise, LINEAR, "AB:order=1", 6, "fused", True, **options), first)
    second = sample(model, noise, LINEAR, "AB", 6, "reference", True, **options)
    assert float((second[-1] - first[-1]).norm()) > 1e-3  # the option changes the method
    assert_states_agree(sample(model, noise, LINEAR, "AB", 6, "torch", True, **options), second)
    assert method_record("AB:order=1").order == 1


def test_register_method_refuses_a_taken_or_bad_name(registry_restored):
    ddim = METHODS["DDIM"]
    for name in ("DDIM", "auto", "A:B"):
        with pytest.raises(UserError, match="taken or not allowed"):
            register_method(Method(name, ddim.build, ddim.reference, 1, "x"))
    with pytest.raises(UserError, match="takes a pndm_fast.Method"):
        register_method("DDIM")


def test_the_documented_prediction_samples_like_the_eps_model(registry_restored, ring):
    exec(doc_block("### Adding a model family"), {})
    model, noise = ring

    def score(x, t):
        sigma = math.sqrt(1 - LINEAR.alpha(float(t[0])))
        return -model(x, t) / sigma

    times = [0, 40, 200, 600, 999]  # integers: the model's float32 times read the same levels as the adapter's
    for backend in ("reference", "fused"):
        ours = sample(Denoiser(score, prediction="score"), noise, LINEAR, "DPM-Solver++2M", None, backend,
                      timesteps=times, end="min")
        theirs = sample(model, noise, LINEAR, "DPM-Solver++2M", None, backend, timesteps=times, end="min")
        assert float((ours - theirs).norm() / theirs.norm()) < 1e-12


def test_a_plan_built_whole_runs_as_its_method_does(ring):
    model, noise = ring
    plan = build_plan(LINEAR, "UniPC-bh1:order=2", 6, "quadratic")
    assert torch.equal(sample(model, noise, LINEAR, plan, backend="torch"),
                       sample(model, noise, LINEAR, "UniPC-bh1:order=2", 6, backend="torch", timesteps="quadratic"))
    with pytest.raises(UserError, match="carries its own grid"):
        sample(model, noise, LINEAR, plan, 6)
    with pytest.raises(UserError, match="a Plan given whole has none"):
        sample(model, noise, LINEAR, plan, backend="reference")


def test_a_time_grid_of_another_schedule_is_refused(ring):
    model, noise = ring
    cosine = Schedule.from_config({"type": "cosine", "diffusion_step": 1000})
    with pytest.raises(UserError, match="made on another schedule"):
        sample(model, noise, LINEAR, "DDIM", timesteps=make_grid(cosine, "logsnr", 5))


def test_the_top_level_shows_only_the_public_names():
    public = {"load_config", "UserError", "build_model", "load_checkpoint", "Schedule", "make_grid", "TimeGrid", "Plan",
              "Method", "METHODS", "method_record", "register_method", "build_plan", "Denoiser", "sample",
              "set_cache_limit", "pretrained", "pretrained_names", "tune", "Profile", "FlowSchedule", "EDMSchedule",
              "VPSchedule", "schedule_from_diffusers", "sample_pipeline"}
    assert set(dir(pndm_fast)) == public
    for name in public:
        assert getattr(pndm_fast, name) is not None


def test_the_package_has_no_import_cycles():
    """Every relative import of pndm_fast, at module level or inside a function, as a graph without cycles
    (planted: diffusers_layout importing diffusers_folder back)."""
    root = REPO / "pndm_fast"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
                deps |= {t for t in [target] + [f"{target}.{a.name}" for a in node.names] if t in modules}
        graph[name] = deps - {name, "pndm_fast"}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph[node]:
            assert state.get(dep) != "open", " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])
