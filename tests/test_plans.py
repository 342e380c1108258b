"""Plans and their executors against the golden trajectories, the float64 reference, and host syncs."""

import copy

import pytest
import torch
from conftest import CallCounter, golden_model, golden_run_params, golden_trajectory, relative_l2

from pndm_fast import Schedule
from pndm_fast.ops import available_impls
from pndm_fast.methods import METHODS, build_plan
from pndm_fast import sampling
from pndm_fast.sampling import sample

LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
F32_RUNS = [p for p in golden_run_params() if p.values[1] is None or p.values[1]["dtype"] == "f32"]
CPU_BACKENDS = available_impls(torch.device("cpu"))  # each fused op that runs here is a backend of its own name


def float64_truth(name, run, noise):
    """The golden float64 trajectory of this run, or (iDDPM has none) the float64 reference computed here."""
    model, meta = golden_model(name)
    f64 = [r for r in golden_model(name)[1]["runs"] if r["dtype"] == "f64" and r["method"] == run["method"]
           and r["sample_speed"] == run["sample_speed"]]
    if f64:
        return golden_trajectory(f64[0], torch.float64)[1]
    with torch.no_grad():
        return sample(copy.deepcopy(model).double(), noise.double(), Schedule.from_config(meta["Schedule"]),
                      run["method"], run["sample_speed"], "reference", return_trajectory=True)


def check_backend_against_golden(name, run, backend, model=None, device="cpu", **options):
    """`backend` on `device` keeps every step within twice the float32 reference's distance to float64."""
    golden, meta = golden_model(name)
    model = model or golden
    noise, golden32 = golden_trajectory(run, torch.float32)
    truth = float64_truth(name, run, noise)
    with torch.no_grad(), CallCounter(model) as counter:
        trajectory = sample(model, noise.to(device), Schedule.from_config(meta["Schedule"]), run["method"],
                            run["sample_speed"], backend, return_trajectory=True, **options).cpu()
    if backend != "graph":  # a graph's replays run the captured kernels, not the module's forward
        assert counter.calls == run["model_calls"]
    for step in range(1, len(truth)):
        ours, baseline = relative_l2(trajectory[step], truth[step]), relative_l2(golden32[step], truth[step])
        assert ours <= 2 * baseline + 1e-7, f"step {step}: {ours:.3e} vs float32 reference {baseline:.3e}"


@pytest.mark.parametrize("backend", ["torch"] + [b for b in CPU_BACKENDS if b != "torch"])
@pytest.mark.parametrize("name,run", F32_RUNS)
def test_fused_backend_is_as_close_to_float64_as_the_float32_reference(name, run, backend):
    check_backend_against_golden(name, run, backend)


@pytest.mark.slow
@pytest.mark.parametrize("name,run", F32_RUNS)
def test_compiled_model_keeps_the_fused_backend_as_close(name, run):
    model = copy.deepcopy(golden_model(name)[0])  # compile=True compiles the model's blocks in place
    check_backend_against_golden(name, run, "fused", model=model, compile=True)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("steps", [1, 2, 4, 10, 21])
def test_a_run_makes_the_model_calls_its_method_declares(method, steps):
    """Three counts that come from different places agree: the forwards a real run makes (counted by a hook),
    the plan's own count, and the registry's formula for the grid's number of steps."""
    model = LinearEps()
    plan = build_plan(LINEAR, method, steps)
    with torch.no_grad(), CallCounter(model) as counter:
        sample(model, torch.randn(1, 3, 4, 4), LINEAR, method, steps, "fused")
    assert counter.calls == plan.model_calls == METHODS[method].model_calls(len(plan.steps))
    assert f"{plan.model_calls} model calls" in str(plan)


def test_the_paper_counts_steps_as_its_integer_skip_does():
    """sample_step 21 gives skip 1000 // 21 = 47 and 22 steps (the paper's seq has 22 entries below 1000)."""
    assert len(build_plan(LINEAR, "DDIM", 21).steps) == 22


def test_plans_are_values_that_can_key_a_cache():
    assert build_plan(LINEAR, "F-PNDM", 20) == build_plan(LINEAR, "F-PNDM", 20)
    assert hash(build_plan(LINEAR, "FON", 20)) == hash(build_plan(LINEAR, "FON", 20))
    assert build_plan(LINEAR, "F-PNDM", 20) != build_plan(LINEAR, "F-PNDM", 21)


class LinearEps(torch.nn.Module):
    """eps = 0.1 x + 1e-4 t: cheap, and its sampling run has a float64 answer to compare with."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, t):
        return x * self.scale + t.view(-1, 1, 1, 1) * 1e-4


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_fused_loop_never_reads_a_value_back_to_the_host(method, backend, monkeypatch):
    noise, model = torch.randn(2, 3, 8, 8), LinearEps()
    with torch.no_grad():
        expected = sample(model, noise.double(), LINEAR, method, 10, "reference")

        def refuse(*args, **kwargs):
            raise AssertionError("host sync inside the sampling loop")

        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        fused = sample(model, noise, LINEAR, method, 10, backend, check_finite=False)
        monkeypatch.undo()
    assert relative_l2(fused, expected) < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_channels_last_buffers_give_the_same_samples(method):
    """NHWC buffers change only the convolutions' rounding: within twice the float32 reference's distance to
    float64, plus 2e-6 (NHWC convolutions on the CPU sum in another order; measured 1e-6 to 1.7e-6 more over a
    5-step run of this model, for every method)."""
    model, meta = golden_model("ddim_small_linear")
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    schedule = Schedule.from_config(meta["Schedule"])
    with torch.no_grad():
        exact = sample(copy.deepcopy(model).double(), noise.double(), schedule, method, 5, "reference")
        baseline = sample(model, noise, schedule, method, 5, "reference")
        nhwc = sample(model, noise, schedule, method, 5, "fused", channels_last=True)
    assert relative_l2(nhwc, exact) <= 2 * relative_l2(baseline, exact) + 2e-6


@pytest.mark.parametrize("method", list(METHODS))
def test_bfloat16_model_with_float32_sampler_state(method, monkeypatch):
    """A bf16 model runs on bf16 inputs while the sampler's state buffers stay float32, and the run keeps within
    twice the float32-state reference's distance to float64. Fails if the state is kept in the model's dtype
    (planted: checkout choosing a bfloat16 state for a bfloat16 model, with the torch combination accepting it)."""
    model, meta = golden_model("ddim_small_linear")
    low_model = copy.deepcopy(model).to(torch.bfloat16)
    noise = torch.randn(2, 3, 16, 16)
    schedule = Schedule.from_config(meta["Schedule"])
    state_dtypes, input_dtypes = set(), set()
    checkout = sampling.checkout

    def recorded(*args, **kwargs):
        owner, key, runner = checkout(*args, **kwargs)
        plan_runner = getattr(runner, "runner", runner)  # a CUDA graph's runner holds the buffers
        state_dtypes.update(buffer.dtype for buffer in plan_runner.buffers.values())
        return owner, key, runner

    monkeypatch.setattr(sampling, "checkout", recorded)
    hook = low_model.register_forward_pre_hook(lambda module, args: input_dtypes.add(args[0].dtype))
    with torch.no_grad():
        exact = sample(copy.deepcopy(model).double(), noise.double(), schedule, method, 10, "reference")
        # the paper's formulas in float32 around the same bf16 model: the error bf16 itself costs
        baseline = sample(low_model, noise, schedule, method, 10, "reference")
        input_dtypes.clear()
        fused = sample(low_model, noise, schedule, method, 10, "fused")
    hook.remove()
    assert state_dtypes == {torch.float32}, f"sampler state in {state_dtypes}"
    assert input_dtypes == {torch.bfloat16}, f"the model ran on {input_dtypes}"
    assert fused.dtype == torch.float32
    assert relative_l2(fused, exact) <= 2 * relative_l2(baseline, exact) + 1e-6


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_float64_model_with_float32_noise_samples_in_float64(backend):
    """The fused op computes in float32 at most: a float64 model must not hand it float64 eps, but get float64
    state and plain-torch combinations, and return the noise's dtype."""
    model, meta = golden_model("ddim_small_linear")
    model64 = copy.deepcopy(model).double()
    noise = torch.randn(2, 3, 16, 16)
    schedule = Schedule.from_config(meta["Schedule"])
    with torch.no_grad():
        exact = sample(model64, noise.double(), schedule, "F-PNDM", 5, "reference")
        ours = sample(model64, noise, schedule, "F-PNDM", 5, backend)
    assert ours.dtype == torch.float32
    assert relative_l2(ours, exact) < 1e-7  # float32 rounding of the result only
