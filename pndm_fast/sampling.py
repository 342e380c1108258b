"""The one public sampling entry point: sample(model, noise, schedule, method, sample_step, backend, ...)."""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections import OrderedDict

import torch

from . import auto
from .adapters import Denoiser, as_denoiser, rescaled_guidance
from .editing import AfterStep, check_image, eps_evaluator, mask_inputs, masked_plan, noised, strength_grid
from .engine import GraphRunner, PlanRunner, load_inputs
from .errors import UserError
from .grids import TimeGrid, make_grid
from .levels import FAMILIES, Level, eps_weights
from .lowering import lower
from .ops import available_impls
from .methods import Method, as_method, check_budget, fit_grid
from .models import input_problem
from .noise import check_seed, step_noise
from .plans import Plan
from .profiling import nvtx_enabled
from .schedule import NoiseSchedule, Schedule
from .compilation import _COMPILED, compiled  # noqa: F401  (compiled is part of this module's API)

BACKENDS = ("auto", "reference", "torch", "fused", "cpp", "triton", "graph")
"""How a run executes: "reference", the methods' own formulas op by op; "torch", the plan with plain-torch
combinations; "fused", the plan with the fastest fused op here; "cpp" or "triton", the plan with that fused op;
"graph", the fused plan with the whole loop in one CUDA graph (CUDA only); "auto", graph on CUDA, else fused."""
FUSED_OP = {"torch": "torch", "fused": "auto", "cpp": "cpp", "triton": "triton", "graph": "auto"}

# Idle runners own buffers (and graphs) for one network, most recently used last; they die with it, since a runner
# never holds its network (the caller is handed the network for each eager run). Each network keeps at most
# `cache_limit()` idle runners. A runner is checked out for the whole of a call, so two threads sampling the same
# shape never share buffers (or replay one CUDA graph at once): the second builds a runner of its own.
_RUNNERS: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
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
    with _LOCK:
        for runners in list(_RUNNERS.values()):
            _trim(runners, cache_limit())


def cached_runner_count(*models) -> int:
    """Idle runners held by the cache for `models` (as sample() was given them: networks or Denoisers), or over
    every live model when none is named."""
    owners = [cache_owner(as_denoiser(m)) for m in models]
    with _LOCK:
        groups = [_RUNNERS.get(owner) for owner in owners] if models else list(_RUNNERS.values())
        return sum(len(idle) for runners in groups if runners for idle in runners.values())


def cache_owner(denoiser: Denoiser):
    """What the runner cache keys a network's runners by: its module, else the callable itself."""
    return denoiser.module if denoiser.module is not None else denoiser.net


def _trim(runners: OrderedDict, limit: int) -> None:
    # Dropping the last reference frees a runner at once (no reference cycles): its buffers return to the
    # allocator and a GraphRunner's CUDA graph releases its private memory pool.
    while sum(len(idle) for idle in runners.values()) > limit:
        key = next(iter(runners))
        runners[key].pop(0)
        if not runners[key]:
            del runners[key]


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "graph" if device.type == "cuda" else "fused"
    if backend == "graph" and device.type != "cuda":
        raise UserError(f"backend 'graph' captures CUDA graphs and needs a CUDA device, not {device.type}; "
                        "use --backend fused (or auto)")
    if backend in ("cpp", "triton") and backend not in available_impls(device):
        raise UserError(f"backend {backend!r} does not run on {device.type} here (the fused ops that do: "
                        f"{', '.join(available_impls(device))}); use --backend fused (or auto)")
    return backend


@functools.lru_cache(maxsize=64)
def cached_plan(grid: TimeGrid, record: Method) -> Plan:
    return record.plan(grid)


@functools.lru_cache(maxsize=64)
def cached_grid(schedule: Schedule, timesteps, sample_step, end) -> TimeGrid:
    return make_grid(schedule, list(timesteps) if isinstance(timesteps, tuple) else timesteps, sample_step, end)


def grid_for(schedule: Schedule, timesteps="uniform", sample_step: int | None = None, end: str | None = None,
             **parameters) -> TimeGrid:
    """The run's grid (cached): `timesteps` a grid name (with its parameters), a list of times, or a TimeGrid."""
    if isinstance(timesteps, TimeGrid):
        if sample_step is not None or end is not None or parameters:
            raise UserError("a TimeGrid is a whole grid: give it without sample_step, end or grid parameters")
        if not timesteps.schedule.same_levels(schedule):
            raise UserError(f"the TimeGrid was made on another schedule ({timesteps.schedule.description}) than the "
                            f"run's ({schedule.description}); make it with make_grid on the run's schedule")
        return timesteps
    if not isinstance(timesteps, str):
        try:
            timesteps = tuple(float(t) for t in timesteps)
        except (TypeError, ValueError):
            raise UserError(f"timesteps must be a grid name or a list of numbers, got {timesteps!r}") from None
    if not parameters and (sample_step is None or type(sample_step) is int) and (end is None or type(end) is str):
        return cached_grid(schedule, timesteps, sample_step, end)
    # anything else (True, 2.0, [2], ...) goes uncached, so that make_grid says what is wrong: the cache would
    # take True and 2.0 for the 1 and 2 they equal
    return make_grid(schedule, list(timesteps) if isinstance(timesteps, tuple) else timesteps, sample_step, end,
                     **parameters)


def resolve_run(schedule: Schedule, method, sample_step=None, timesteps="uniform", end=None, model_calls=None,
                **grid_parameters) -> tuple[Method | None, TimeGrid | None, Plan]:
    """(record, grid, plan) of a run: `method` a name, "auto", a Method or a Plan; `model_calls` a budget that the
    method's steps are fitted to (auto's is its table's). Record and grid are None for a Plan given whole."""
    if not isinstance(schedule, NoiseSchedule):
        raise UserError(f"schedule must be a pndm_fast.Schedule (e.g. Schedule.from_config(config['Schedule'])) or "
                        f"a continuous one (pndm_fast.continuous), got {type(schedule).__name__}")
    if isinstance(method, Plan):
        if sample_step is not None or model_calls is not None or end is not None or grid_parameters or not (
                isinstance(timesteps, str) and timesteps == "uniform"):
            raise UserError("a Plan carries its own grid: give it without sample_step, model_calls, timesteps or end")
        return None, None, method
    if model_calls is not None and sample_step is not None:
        raise UserError("give sample_step (steps of the grid) or model_calls (a budget the steps are fitted to), "
                        "not both")
    if method == auto.AUTO:
        if sample_step is not None:
            raise UserError("method auto chooses its steps from a budget: give model_calls=N, not sample_step")
        if grid_parameters:
            raise UserError("method auto chooses its own time grid: drop the grid parameters (or name a method)")
        record, grid = auto.choose(schedule, 50 if model_calls is None else model_calls, timesteps, end)
    else:
        record = as_method(method)
        if model_calls is None:
            grid = grid_for(schedule, timesteps, sample_step, end, **grid_parameters)
        else:
            grid = fit_grid(record, model_calls,
                            lambda steps: grid_for(schedule, timesteps, steps, end, **grid_parameters))
    return record, grid, cached_plan(grid, record)


def model_dtype_of(model, noise_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype the model computes in: its first parameter's; for a model without parameters (a plain function),
    float64 with float64 noise, else float32."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.dtype
    return torch.float64 if noise_dtype == torch.float64 else torch.float32


def sample(model, noise: torch.Tensor, schedule: Schedule, method="F-PNDM", sample_step: int | None = None,
           backend: str = "auto", return_trajectory: bool = False, *, timesteps="uniform", end: str | None = None,
           model_calls: int | None = None, profile=None, seed: int = 0, indices=None, init_image=None,
           strength: float | None = None, mask=None, callback=None, progress: bool = False, compile: bool = False,
           nvtx: bool | None = None, channels_last: bool = False, check_finite: bool = True) -> torch.Tensor:
    """Sample from `noise` (B, C, H, W) with `method` in `sample_step` steps (default 50) of the grid `timesteps`.

    `model` is a network called as model(x, t) returning eps, or a `Denoiser` (x0/v prediction, conditioning,
    classifier-free guidance, diffusers UNets). `method`: a registered name with its options ("DEIS:order=4"), a
    `Method`, a `Plan` built whole (it carries its grid), or "auto". `timesteps`: "uniform" (the paper's integer
    skip, the default), "quadratic", "logsnr", "karras", an increasing list of times, or a `TimeGrid`; `end`
    ("zero" or "min") says where a named non-uniform grid ends (pndm_fast/grids.py). `model_calls=N` instead of
    `sample_step` fits the steps to a budget of N model calls; `method="auto"` then runs the choice of `profile`
    (a `pndm_fast.tune` result made for this model; the bundled models' own by default), else the method and grid
    the accuracy study measured most accurate for it (pndm_fast/auto.py). `backend`: one of `BACKENDS`.
    A stochastic method ("Euler-a", "DDIM:eta=1", ...) draws fresh noise per step: image `indices[i]`'s k-th draw
    depends on (`seed`, indices[i], k) only (pndm_fast/noise.py), so the image does not depend on the batch it
    is in, and a run is a function of its arguments like every other; `indices` default to 0 .. B - 1.

    Editing (pndm_fast/editing.py, diffusers' conventions): `init_image` (shaped like the noise) with `strength`
    s in (0, 1] runs the last floor(S s) steps of the grid from the image noised to their first level; `mask`
    (1: repaint, 0: keep; broadcast to the noise) blends the kept pixels back at each step's level, as a plan entry
    (every plan backend, the CUDA graph too). `callback(step, t, x, x0_pred)` runs after every step with the state
    at time t (x may be changed in place) and the data prediction of the step's last model call; `progress=True`
    shows a bar of steps. The callback and the bar run on the plan backends; the graph backend then replays one
    CUDA graph per step (auto picks the eager fused backend for a watched run).

    Returns the final x in noise's dtype, or with return_trajectory a (steps + 1, B, C, H, W) tensor whose
    entry 0 is the noise. The model runs in its own parameters' dtype; the fast backends keep the sampler state
    in float32 (float64 when the noise or the model is float64). `compile=True` compiles the network's blocks in
    place, once. Runs without autograd. Safe to call from several threads at once, on one model too.

    The inputs are checked before anything runs (UserError, one line): rank 4, a floating dtype, a non-empty
    batch, the model's device and not meta, channels and size the model takes, and finite values.
    `check_finite=False` skips the last check, the only one that reads a value back from the device (one host
    sync per call), for latency-critical callers that know their noise is finite.
    """
    denoiser = as_denoiser(model)
    if method == auto.AUTO or profile is not None:
        method, timesteps, model_calls = profiled(denoiser, schedule, method, sample_step, model_calls, profile,
                                                  timesteps, end)
    record, grid, plan = resolve_run(schedule, method, sample_step, timesteps, end, model_calls)
    denoiser.check_schedule(schedule)
    check_inputs(denoiser, noise, check_finite)
    start, watched = noise, callback is not None or progress
    # auto picks the eager fused backend for a run that something watches between steps (no graph)
    backend = resolve_backend("fused" if watched and backend == "auto" else backend, noise.device)
    if init_image is not None or strength is not None or mask is not None:
        grid, plan, start, init_image, mask = edited(record, grid, noise, init_image, strength, mask)
    if watched and backend == "reference":
        raise UserError("a callback and progress run between the steps of a plan: backend 'reference' has no "
                        "such place; use backend fused, torch or graph")
    if mask is not None and backend == "reference":
        raise UserError("a mask is blended by the plan: backend 'reference' runs a method's own formulas and has "
                        "no blend; use backend torch, fused or graph")
    if callback is not None and not callable(callback):
        raise UserError(f"callback must be callable as callback(step, t, x, x0_pred), got {type(callback).__name__}")
    draws = None
    if plan.draws:
        seed, indices = check_seed(seed, noise.shape[0], indices)
        draws = step_noise(seed, indices, plan.draws, tuple(noise.shape[1:]), noise.device)
    module = denoiser.module
    if compile and module is not None:
        compiled(module)
    with torch.no_grad():
        if backend == "reference":
            if record is None:
                raise UserError("backend 'reference' runs a method's own formulas: a Plan given whole has none; "
                                "use backend torch")
            # The methods' formulas are written for float32 or float64: in float16 the alpha table loses its last
            # steps (ac ~ 4e-5 is subnormal there) and the run ends in NaN. Half noise runs in float32, exactly
            # like the fast backends' float32 state, and comes back in its own dtype.
            state = start.float() if start.dtype in (torch.float16, torch.bfloat16) else start
            states = record.run_reference(reference_eps_model(denoiser, noise.shape[1], schedule), state, grid,
                                          None if draws is None else draws.to(state))
            out = torch.stack(states) if return_trajectory else states[-1]
            return in_family(out, schedule, grid.level, grid.times, return_trajectory).to(noise.dtype)
        owner, key, runner = checkout(denoiser, plan, schedule, noise, backend, return_trajectory,
                                      nvtx_enabled(nvtx), channels_last, segmented=watched)
        after = None
        try:
            runner.caller.load(denoiser)
            draws = None if draws is None else draws.to(runner.x.device, non_blocking=True)
            level = grid.level if grid is not None else schedule.alpha
            masks = None if mask is None else mask_inputs(mask, init_image, noise, runner.x)
            if watched:
                after = AfterStep(runner, plan.times, level, callback, eps_evaluator(denoiser, schedule), progress)
                load_inputs(runner, start, draws, masks)
                runner.walk(after)
            else:
                runner.run(start, draws, masks)
            out = runner.trajectory if return_trajectory else runner.x
            result = in_family(out, schedule, level, plan.times, return_trajectory).to(noise.dtype, copy=True)
        finally:
            runner.caller.release()
            if after is not None:
                after.close()
        checkin(owner, key, runner)
        return result


def in_family(out: torch.Tensor, schedule: NoiseSchedule, level, times, trajectory: bool) -> torch.Tensor:
    """A run's result in its model family's own state: the solvers' variance-preserving state times the family's
    factor at each state's level (1 on a VP schedule, and at the data on every schedule). `out` is the final
    state at times[-1], or with `trajectory` the states at every time."""
    if schedule.family == "vp":
        return out
    factors = [FAMILIES[schedule.family](Level.of(level(t))) for t in (times if trajectory else times[-1:])]
    if not trajectory:
        return out * factors[0]
    return out * torch.tensor(factors, dtype=out.dtype, device=out.device).view(-1, *[1] * (out.dim() - 1))


def edited(record, grid, noise, init_image, strength, mask):
    """(grid, plan, start state, init_image, mask) of an img2img or inpainting run (pndm_fast/editing.py),
    the image and mask checked and in the noise's dtype."""
    if grid is None:
        raise UserError("init_image, strength and mask cut and blend a method's grid: a Plan given whole has none")
    if init_image is None:
        raise UserError("strength and mask edit an image: give init_image= too")
    init_image = check_image(init_image, noise, "init_image")
    if mask is not None:
        mask = check_image(mask, noise, "mask")
    if strength is not None:
        grid = strength_grid(grid, strength)
    # at strength 1 the run starts from the noise itself, as diffusers' pipelines do
    start = noise if strength is None or strength == 1 else noised(init_image, noise, grid.level(grid.times[0]))
    plan = cached_plan(grid, record)
    return grid, plan if mask is None else cached_masked_plan(plan, grid), start, init_image, mask


@functools.lru_cache(maxsize=64)
def cached_masked_plan(plan: Plan, grid: TimeGrid) -> Plan:
    return masked_plan(plan, grid)


def profiled(denoiser: Denoiser, schedule: Schedule, method, sample_step, model_calls, profile, timesteps, end):
    """(method, timesteps, model_calls) of an auto run: the profile's choice for the budget when a profile (given,
    or bundled for this model) applies, else auto's own (method "auto", unchanged)."""
    from .tuning.profile import Profile, bundled_profile

    if method != auto.AUTO:
        raise UserError("profile= holds the choices of method auto: give method=\"auto\" with it")
    if profile is not None and not isinstance(profile, Profile):
        raise UserError(f"profile must be a pndm_fast.tuning.Profile (Profile.load(path)), got "
                        f"{type(profile).__name__}")
    if not isinstance(schedule, NoiseSchedule):
        return method, timesteps, model_calls  # resolve_run says what is wrong
    found = profile if profile is not None else bundled_profile(denoiser, schedule)
    if found is None:
        return method, timesteps, model_calls
    if sample_step is not None or end is not None or not (isinstance(timesteps, str) and timesteps == "uniform"):
        raise UserError("method auto chooses its own time grid (here its profile's): give model_calls=N only (or name "
                        "a method)")
    found.check(denoiser, schedule)
    chosen, grid = found.choice(schedule, check_budget(50 if model_calls is None else model_calls))
    return chosen, grid, None


def model_device(model) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a model that holds no tensors (or a plain
    function)."""
    if not isinstance(model, torch.nn.Module):
        return None
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def check_inputs(denoiser: Denoiser, noise, check_finite: bool = True) -> None:
    """Refuse what would otherwise fail deep inside torch (or run on garbage), with one line that says what to do.

    Reads only shapes, dtypes and devices, except the finiteness check: one reduction and one host sync.
    """
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
    module = denoiser.module
    device = model_device(module)
    if device is not None and device.type == "meta":
        raise UserError("the model's parameters are on the meta device, which holds no values: build it on a "
                        "real device (or model.to_empty(device=...)) and load a checkpoint")
    if device is not None and device != noise.device:
        raise UserError(f"the model is on {device} and the noise on {noise.device}: expected the same device; "
                        f"move the noise with noise.to('{device}')")
    for branch in ("cond", "uncond"):
        for name, value in getattr(denoiser, branch).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != noise.shape[0]:
                raise UserError(f"Denoiser {branch}[{name!r}] has {value.shape[0]} rows for a batch of "
                                f"{noise.shape[0]}: expected one row per image")
    problem = input_problem(module, tuple(noise.shape))
    if problem:
        raise UserError(problem)
    if check_finite and not bool(torch.isfinite(noise).all()):
        raise UserError("noise holds NaN or Inf: expected finite values (e.g. torch.randn); check how it was made")


def reference_eps_model(model, channels: int, schedule: Schedule | None = None):
    """eps = m(x, t) for the reference backend, written plainly: the network at its time input for t as a tensor
    of shape (batch,), all equal (float64 for a float64 network, else float32), reading its family's state;
    with a Denoiser, guidance as eps_u + w (eps_c - eps_u) from two separate forwards, and a prediction other
    than eps converted at the model's level alpha(t)."""
    denoiser = as_denoiser(model)
    time_dtypes = {}  # the time's dtype for each state dtype (the model's dtype does not change during a run)

    def raw(x: torch.Tensor, t: float, kwargs: dict) -> torch.Tensor:
        time = t if schedule is None else denoiser.network_time(schedule, t)
        if x.dtype not in time_dtypes:
            float64 = model_dtype_of(denoiser.module, x.dtype) == torch.float64
            time_dtypes[x.dtype] = torch.float64 if float64 else torch.float32
        time_dtype = time_dtypes[x.dtype]
        times = torch.full((x.shape[0],), time, dtype=time_dtype, device=x.device)
        scale = 1.0 if schedule is None else denoiser.input_scale(schedule, t)
        out = denoiser.net(x if scale == 1.0 else scale * x, times, **denoiser.model_kwargs, **kwargs)
        if out.shape[1] == 2 * channels:
            out = out[:, :channels]
        return out.to(x.dtype)

    def as_eps(x: torch.Tensor, t: float, out: torch.Tensor) -> torch.Tensor:
        if denoiser.prediction == "eps":
            return out
        on_x, on_output = eps_weights(denoiser.prediction, schedule.alpha(t))
        return on_x * x + on_output * out

    def forward(x: torch.Tensor, t: float, kwargs: dict) -> torch.Tensor:
        return as_eps(x, t, raw(x, t, kwargs))

    def eps(x: torch.Tensor, t: float) -> torch.Tensor:
        w = denoiser.guidance
        if w == 1.0:
            return forward(x, t, denoiser.cond)
        if denoiser.guidance_rescale:  # rescaled in the network's own output space, then read as eps
            cond, uncond = raw(x, t, denoiser.cond), raw(x, t, denoiser.uncond)
            return as_eps(x, t, rescaled_guidance(uncond + w * (cond - uncond), cond, denoiser.guidance_rescale))
        eps_u = forward(x, t, denoiser.uncond)
        return eps_u + w * (forward(x, t, denoiser.cond) - eps_u)

    return eps


def _signature(denoiser: Denoiser) -> tuple:
    """What a runner bakes in of a Denoiser: its reading, and the shape of every input it passes (values are
    loaded at each call)."""
    def shape_of(kwargs: dict) -> tuple:
        return tuple((k, ("tensor", tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else repr(v))
                     for k, v in kwargs.items())

    return (denoiser.prediction, denoiser.time_input, denoiser.guidance, denoiser.guidance_rescale,
            shape_of(denoiser.cond), shape_of(denoiser.uncond),
            shape_of(denoiser.model_kwargs), type(denoiser.net).__name__)


def checkout(denoiser: Denoiser, plan: Plan, schedule: Schedule, noise, backend, trajectory, nvtx, channels_last,
             segmented: bool = False):
    """(owner, key, runner): an idle runner for this network, plan, shape and dtype, or a new one. The caller owns
    it until `checkin`. `segmented`: a graph runner replays one graph per step, for a run watched between steps."""
    module, owner = denoiser.module, cache_owner(denoiser)
    model_dtype = model_dtype_of(module, noise.dtype)
    # float64 noise or a float64 model asks for float64 throughout (the fused op computes in float32 at most, so
    # the executor then combines with plain torch); anything else keeps the state in float32.
    state_dtype = torch.float64 if torch.float64 in (noise.dtype, model_dtype) else torch.float32
    # Buffers made under inference_mode are inference tensors, which a later no_grad call may not write into:
    # the mode keys its own runner. Compiling keys one too, so that no graph captured eagerly is replayed after.
    segmented = segmented and backend == "graph"
    key = (plan, _signature(denoiser), tuple(noise.shape), noise.device, state_dtype, backend, trajectory, nvtx,
           channels_last, owner in _COMPILED, torch.is_inference_mode_enabled(), segmented)
    with _LOCK:
        runners = _RUNNERS.get(owner)
        if runners is None:
            runners = _RUNNERS[owner] = OrderedDict()
        idle = runners.get(key)
        if idle:
            runner = idle.pop()
            if not idle:
                del runners[key]
            return owner, key, runner
    program = lower(plan, denoiser, schedule)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    caller = denoiser.caller(noise.shape, model_dtype, state_dtype, noise.device, program.times, schedule, fmt)
    runner = PlanRunner(program, caller, noise.shape, noise.device, model_dtype, state_dtype,
                        fused_op=FUSED_OP[backend], nvtx=nvtx, channels_last=channels_last,
                        trajectory=trajectory)
    if backend == "graph":
        caller.load(denoiser)
        try:
            runner = GraphRunner(runner, segmented)
        finally:
            caller.release()
    return owner, key, runner


def checkin(owner, key, runner) -> None:
    """Give a runner back to the cache (most recently used), trimming it to `cache_limit()`."""
    with _LOCK:
        runners = _RUNNERS.get(owner)
        if runners is None:
            runners = _RUNNERS[owner] = OrderedDict()
        runners.setdefault(key, []).append(runner)
        runners.move_to_end(key)
        _trim(runners, cache_limit())


