"""The one public sampling entry point: sample(model, noise, schedule, method, sample_step, backend, ...)."""

from __future__ import annotations

import functools
import os
import weakref
from collections import OrderedDict

import torch

from . import reference
from .compilation import compiled, _COMPILED
from .engine import GraphRunner, PlanRunner
from .errors import UserError
from .models import input_problem
from .plans import PLAN_BUILDERS, Plan, build_plan
from .profiling import nvtx_enabled
from .schedule import Schedule

METHODS = tuple(PLAN_BUILDERS)
BACKENDS = ("auto", "reference", "torch", "fused", "graph")
"""reference: the paper's formulas op by op. torch: plans with plain-torch combinations. fused: plans with the
fused op (Triton on CUDA, C++ on CPU). graph: fused, with the whole loop in one CUDA graph (CUDA only)."""

# Runners own buffers (and graphs) for one model, most recently used last; they die with it, since a runner holds
# its model only through a weak proxy (a strong reference from the value would keep the key alive for ever).
# Each model keeps at most `cache_limit()` runners: one per (plan, shape, dtype, ...) met, so a server sampling
# many shapes would otherwise keep every shape's buffers (and CUDA graph pool) for as long as the model lives.
_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
CACHE_ENV = "PNDM_FAST_RUNNER_CACHE"
DEFAULT_CACHE_LIMIT = 8
_cache_limit: int | None = None  # set_cache_limit's value; None: the environment variable, else the default
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cache_limit() -> int:
    """How many runners each model keeps: set_cache_limit's value, else $PNDM_FAST_RUNNER_CACHE, else 8."""
    if _cache_limit is not None:
        return _cache_limit
    raw = os.environ.get(CACHE_ENV, "").strip()
    if not raw:
        return DEFAULT_CACHE_LIMIT
    if not raw.isdigit():
        raise UserError(f"{CACHE_ENV}={raw!r} is not a count: expected an integer >= 0 (runners kept per model, "
                        f"0 keeps none); unset it for the default {DEFAULT_CACHE_LIMIT}")
    return int(raw)


def set_cache_limit(limit: int | None) -> None:
    """Keep at most `limit` runners (buffers, CUDA graphs) per model, evicting the least recently used; 0 keeps
    none (every call builds its runner afresh), None goes back to $PNDM_FAST_RUNNER_CACHE or the default 8."""
    global _cache_limit
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise UserError(f"cache limit must be an integer >= 0 or None, got {limit!r}")
    _cache_limit = limit
    for runners in list(_RUNNERS.values()):
        _trim(runners, cache_limit())


def cached_runner_count() -> int:
    """Runners held by the cache, over every live model."""
    return sum(len(runners) for runners in list(_RUNNERS.values()))


def _trim(runners: OrderedDict, limit: int) -> None:
    # Dropping the last reference frees a runner at once (no reference cycles): its buffers return to the
    # allocator and a GraphRunner's CUDA graph releases its private memory pool.
    while len(runners) > limit:
        runners.popitem(last=False)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "graph" if device.type == "cuda" else "fused"
    if backend == "graph" and device.type != "cuda":
        raise UserError(f"backend 'graph' captures CUDA graphs and needs a CUDA device, not {device.type}; "
                        "use --backend fused (or auto)")
    return backend


@functools.lru_cache(maxsize=64)
def cached_plan(schedule: Schedule, method: str, sample_step: int) -> Plan:
    return build_plan(schedule, method, sample_step)


def model_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model computes in: its first parameter's, float32 for a model without parameters."""
    for param in model.parameters():
        return param.dtype
    return torch.float32


def sample(model: torch.nn.Module, noise: torch.Tensor, schedule: Schedule, method: str = "F-PNDM",
           sample_step: int = 50, backend: str = "reference", return_trajectory: bool = False, *,
           compile: bool = False, nvtx: bool | None = None, channels_last: bool = False,
           impl: str = "auto", check_finite: bool = True) -> torch.Tensor:
    """Sample from `noise` (B, C, H, W) with `method` in `sample_step` steps.

    Returns the final x in noise's dtype, or with return_trajectory a (steps + 1, B, C, H, W) tensor whose
    entry 0 is the noise. The model runs in its own parameters' dtype; the fast backends keep the sampler state
    in float32 (float64 when the noise is float64). `compile=True` compiles the model's blocks in place, once
    (see `compiled`). `impl` picks the fused op's implementation ("auto", "triton", "cpp" or "torch").
    Runs without autograd: sampling never needs gradients, and a captured graph must not record them.

    The noise is checked before anything runs (UserError, one line): rank 4, a floating dtype, a non-empty
    batch, the model's device and not meta, channels and size the model takes, and finite values.
    `check_finite=False` skips the last check, the only one that reads a value back from the device (one host
    sync per call), for latency-critical callers that know their noise is finite.
    """
    check_inputs(model, noise, schedule, method, sample_step, check_finite)
    backend = resolve_backend(backend, noise.device)
    net = compiled(model) if compile else model
    with torch.no_grad():
        if backend == "reference":
            # The paper's formulas are written for float32 or float64: in float16 its alpha table loses its last
            # steps (ac ~ 4e-5 is subnormal there) and the run ends in NaN. Half noise runs in float32, exactly
            # like the fast backends' float32 state, and comes back in its own dtype.
            state = noise.float() if noise.dtype in (torch.float16, torch.bfloat16) else noise
            x = reference.sample_reference(reference_eps_model(net, noise.shape[1]), state, schedule, method,
                                           sample_step, return_trajectory)
            return x.to(noise.dtype)
        runner = plan_runner(model, noise, schedule, method, sample_step, backend, return_trajectory,
                             nvtx_enabled(nvtx), channels_last, impl)
        runner.run(noise)
        out = runner.trajectory if return_trajectory else runner.x
        return out.to(noise.dtype, copy=True)


def model_device(model: torch.nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model that holds no tensors (or a plain
    function, which the reference backend takes)."""
    if not isinstance(model, torch.nn.Module):
        return None
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def check_inputs(model, noise, schedule, method, sample_step, check_finite: bool = True) -> None:
    """Refuse what would otherwise fail deep inside torch (or run on garbage), with one line that says what to do.

    Reads only shapes, dtypes and devices, except the finiteness check: one reduction and one host sync.
    """
    if not isinstance(method, str) or method not in PLAN_BUILDERS:
        raise UserError(f"unknown method {method!r}: expected one of {', '.join(PLAN_BUILDERS)}")
    if not isinstance(schedule, Schedule):
        raise UserError(f"schedule must be a pndm_fast.Schedule (e.g. Schedule.from_config(config['Schedule'])), "
                        f"got {type(schedule).__name__}")
    schedule.time_steps(sample_step)  # refuses a step count that is not an integer from 1 to diffusion_step
    if not isinstance(noise, torch.Tensor):
        raise UserError(f"noise must be a torch.Tensor of shape (batch, channels, height, width), got "
                        f"{type(noise).__name__}; e.g. torch.randn(16, 3, 32, 32)")
    if noise.dim() != 4:
        raise UserError(f"noise must be (batch, channels, height, width), got shape {tuple(noise.shape)}")
    if noise.dtype not in STATE_DTYPES:
        raise UserError(f"noise has dtype {noise.dtype}: expected a real floating dtype (float32, float64, "
                        "bfloat16 or float16); draw it with torch.randn")
    if noise.numel() == 0:
        raise UserError(f"noise of shape {tuple(noise.shape)} is empty: expected at least one image of at least "
                        "one channel and one pixel")
    if noise.device.type == "meta":
        raise UserError("noise is on the meta device, which holds no values: draw it on the model's device")
    device = model_device(model)
    if device is not None and device.type == "meta":
        raise UserError("the model's parameters are on the meta device, which holds no values: build it on a "
                        "real device (or model.to_empty(device=...)) and load a checkpoint")
    if device is not None and device != noise.device:
        raise UserError(f"the model is on {device} and the noise on {noise.device}: expected the same device; "
                        f"move the noise with noise.to('{device}')")
    problem = input_problem(model, tuple(noise.shape))
    if problem:
        raise UserError(problem)
    if check_finite and not bool(torch.isfinite(noise).all()):
        raise UserError("noise holds NaN or Inf: expected finite values (e.g. torch.randn); check how it was made")


def reference_eps_model(model: torch.nn.Module, channels: int):
    """eps = m(x, t) with t as the reference passes it: a float32 tensor of shape (batch,), all equal."""
    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        return model(x, torch.full((x.shape[0],), t, dtype=torch.float32, device=x.device))[:, :channels]

    return eps


def plan_runner(model, noise, schedule, method, sample_step, backend, trajectory, nvtx, channels_last, impl):
    """The runner for this model, shape, dtype and plan: built on first use and kept with the model, up to
    `cache_limit()` runners per model, least recently used evicted first."""
    plan = cached_plan(schedule, method, sample_step)
    # float64 noise or a float64 model asks for float64 throughout (the fused op computes in float32 at most, so
    # the executor then combines with plain torch); anything else keeps the state in float32.
    state_dtype = torch.float64 if torch.float64 in (noise.dtype, model_dtype_of(model)) else torch.float32
    # Buffers made under inference_mode are inference tensors, which a later no_grad call may not write into:
    # the mode keys its own runner. Compiling keys one too, so that no graph captured eagerly is replayed after.
    key = (plan, tuple(noise.shape), noise.device, state_dtype, backend, trajectory, nvtx, channels_last, impl,
           model in _COMPILED, torch.is_inference_mode_enabled())
    runners = _RUNNERS.get(model)
    if runners is None:
        runners = _RUNNERS[model] = OrderedDict()
    runner = runners.get(key)
    if runner is not None:
        runners.move_to_end(key)
        return runner
    runner = PlanRunner(plan, weakref.proxy(model), noise.shape, noise.device, model_dtype_of(model), state_dtype,
                        impl="torch" if backend == "torch" else impl, nvtx=nvtx, channels_last=channels_last,
                        trajectory=trajectory)
    if backend == "graph":
        runner = GraphRunner(runner)
    runners[key] = runner
    _trim(runners, cache_limit())
    return runner
