"""A diffusers scheduler backed by a pndm_fast plan (docs/diffusers.md): drop any method into a stock pipeline.

    pipe.scheduler = PlanScheduler.from_config(pipe.scheduler.config, method="UniPC-bh1:order=2")

The config it replaces says the schedule, the network's prediction and its time input
(`pndm_fast.diffusers_schedulers`), and its own `set_timesteps` says the times (spacing, Karras or flow sigmas,
shift), so the pipeline samples on the grid it always did, with the plan's method. `step` runs the plan's entries
from one model call to the next in plain torch, in the state's dtype (float32 at least): a pipeline's loop and its
callbacks see every model input as its own scheduler's would be scaled. Needs diffusers (its scheduler base
classes); `pndm_fast.sample_pipeline` runs a whole loop through `sample()` instead.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from .adapters import TIME_INPUTS
from .diffusers_schedulers import CLASSES, method_for_steps, read_scheduler
from .errors import UserError
from .grids import MODEL, TimeGrid
from .levels import FAMILIES, INPUT_SCALES, Level, eps_weights
from .methods import method_record
from .multistep_reference import dynamic_threshold
from .plans import Draw, Lin, ModelCall, Threshold

SELF = "PlanScheduler"


@dataclass
class PlanSchedulerOutput(BaseOutput):
    """What `PlanScheduler.step` returns: the next model input (or, after the last call, the final sample)."""

    prev_sample: torch.Tensor


class PlanScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler whose steps are a pndm_fast method's plan on the replaced scheduler's own times."""

    config_name = "scheduler_config.json"
    order = 1

    def __init__(self, base_config: dict | None = None, method: str | None = None):
        base = dict(base_config or {"_class_name": "DDIMScheduler"})
        self.reading = read_scheduler(base)
        name = method or base.get("method") or self.reading.method
        if name is None:
            raise UserError(f"{self.reading.class_name} has no pndm_fast method with its exact steps: give "
                            "method=, e.g. \"UniPC-bh2\"")
        method_record(name)  # an unknown method or option is one line now, not at set_timesteps
        self.method_name = method
        self.register_to_config(**{k: v for k, v in base.items() if not k.startswith("_")},
                                base_class=self.reading.class_name, method=method)
        self._base_config, self.timesteps, self.plan, self.grid = base, None, None, None
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config=None, method: str | None = None, return_unused_kwargs: bool = False, **kwargs):
        """A PlanScheduler reading the config of the scheduler it replaces (a diffusers scheduler config, or a saved
        PlanScheduler's), running `method` (by default the method equal to that scheduler, where there is one)."""
        config = {**dict(config or {}), **kwargs}
        if config.get("_class_name", SELF) == SELF and "base_class" in config:
            method = method or config.get("method")
            config["_class_name"] = config.pop("base_class")
        config.pop("method", None)
        config.setdefault("_class_name", _class_of(config))
        scheduler = cls(config, method)
        return (scheduler, {}) if return_unused_kwargs else scheduler

    @classmethod
    def from_scheduler(cls, scheduler, method: str | None = None) -> "PlanScheduler":
        """A PlanScheduler replacing the diffusers scheduler `scheduler`, running `method`."""
        return cls.from_config({**dict(scheduler.config), "_class_name": type(scheduler).__name__}, method)

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the starting latents: the family's factor at the first level (1 for VP and for a flow,
        as diffusers' flow pipelines take their latents as they are; sqrt(1 + sigma_max^2) for EDM)."""
        if self.grid is None or self.reading.schedule.family != "ve":
            return 1.0
        return FAMILIES["ve"](Level.of(self.grid.level(self.grid.times[0])))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None,
                      mu: float | None = None):
        """The times of the replaced scheduler's own set_timesteps (with its custom timesteps, sigmas or mu), and
        the plan of the method on them."""
        import diffusers

        base_cls = getattr(diffusers, self.reading.class_name)
        base = base_cls.from_config({k: v for k, v in self._base_config.items() if k != "method"})
        accepted = inspect.signature(base.set_timesteps).parameters
        extra = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu))
                 if v is not None and k in accepted}
        base.set_timesteps(num_inference_steps, **extra)
        reading = read_scheduler(self._base_config, math.exp(mu) if mu is not None else None)
        self.reading, schedule = reading, reading.schedule
        times, labels = _grid_times(base, schedule, self._base_config)
        self.grid = TimeGrid(schedule, tuple(times), MODEL, "diffusers")
        steps = len(times) - 1
        name = self.method_name or method_for_steps(reading, self._base_config, steps)
        self.plan = method_record(name).plan(self.grid)
        self.entries = [entry for step in self.plan.steps for entry in step]
        self.calls = [i for i, entry in enumerate(self.entries) if isinstance(entry, ModelCall)]
        call_times = [self.entries[i].t for i in self.calls]
        net_times = [labels[t] if t in labels else TIME_INPUTS[reading.time_input](schedule, t) for t in call_times]
        integral = all(float(t).is_integer() for t in net_times)
        self.timesteps = torch.tensor(net_times, dtype=torch.int64 if integral else torch.float32, device=device)
        self.num_inference_steps = steps
        self.sigmas = torch.tensor([Level.of(self.grid.level(t)).rho for t in times], dtype=torch.float32)
        self._index, self._buffers = 0, {}

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The network's input: the sample, times EDM's c_in for an EDM network (others read it as it is)."""
        factor = INPUT_SCALES.get(self.reading.prediction)
        if factor is None:
            return sample
        call = self.entries[self.calls[min(self._index, len(self.calls) - 1)]]
        return sample * factor(Level.of(self.grid.level(call.t)))

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs):
        """Read the model's output at the pending model call, run the plan up to the next one, and return the
        next model input (after the last call, the final sample), in the family's own scaling."""
        if self.plan is None:
            raise UserError("PlanScheduler.step before set_timesteps: call set_timesteps(num_inference_steps) first")
        if self._index >= len(self.calls):
            raise UserError(f"PlanScheduler.step called more often than its {len(self.calls)} model calls")
        dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
        call = self.entries[self.calls[self._index]]
        level = self.grid.level(call.t)
        src = self._buffers[call.src] = sample.to(dtype) / self._factor(level)
        out = model_output
        if out.shape[1] == 2 * sample.shape[1]:
            out = out[:, :sample.shape[1]]  # a learned sigma: its eps half
        on_x, on_output = eps_weights(self.reading.prediction, level)
        self._buffers[call.dst] = on_x * src + on_output * out.to(dtype) if on_x else on_output * out.to(dtype)
        end = self.calls[self._index + 1] if self._index + 1 < len(self.calls) else len(self.entries)
        for entry in self.entries[self.calls[self._index] + 1:end]:
            self._run(entry, sample, generator)
        self._index += 1
        if end < len(self.entries):
            following = self.entries[end]
            result = self._buffers[following.src] * self._factor(self.grid.level(following.t))
        else:
            result = self._buffers["x"] * self._factor(self.grid.level(self.grid.times[-1]))
        result = result.to(sample.dtype)
        return PlanSchedulerOutput(prev_sample=result) if return_dict else (result,)

    def _run(self, entry, like: torch.Tensor, generator) -> None:
        buffers = self._buffers
        if isinstance(entry, Lin):
            terms = list(entry.expr.terms.items())
            value = float(terms[0][1]) * buffers[terms[0][0]]
            for name, coefficient in terms[1:]:
                value = value + float(coefficient) * buffers[name]
            buffers[entry.out] = value
        elif isinstance(entry, Draw):
            buffers[entry.dst] = torch.randn(like.shape, generator=generator, device=like.device,
                                             dtype=buffers["x"].dtype)
        elif isinstance(entry, Threshold):
            buffers[entry.buf] = dynamic_threshold(buffers[entry.buf], entry.ratio, entry.max_value)

    def _factor(self, level: float) -> float:
        return FAMILIES[self.reading.schedule.family](Level.of(level))

    def __len__(self) -> int:
        return int(self._base_config.get("num_train_timesteps", 1000))


def _class_of(config: dict) -> str:
    """The scheduler class a config belongs to when it does not name it (a scheduler made in code, not loaded):
    the one whose constructor takes exactly its keys."""
    import diffusers

    keys = {k for k in config if not k.startswith("_")}
    found = [name for name in CLASSES
             if set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"} == keys]
    if len(found) != 1:
        raise UserError("the scheduler config names no _class_name and its keys fit "
                        f"{' and '.join(found) or 'no scheduler pndm_fast reads'}: pass the scheduler itself "
                        "(PlanScheduler.from_scheduler(pipe.scheduler, ...)) or add _class_name")
    return found[0]


def _grid_times(base, schedule, config: dict) -> tuple[list[float], dict[float, float]]:
    """The replaced scheduler's times as the schedule's own, largest first, the last being where it ends (from its
    sigmas where it has them, each read as a level; else its integer timesteps and its final alpha), and the
    timestep it passes the network at each: the pipeline's network sees exactly its own scheduler's times."""
    sigmas = getattr(base, "sigmas", None)
    given = [float(t) for t in base.timesteps.tolist()]
    if sigmas is None or len(sigmas) <= 1:
        ends_on_data = config.get("set_alpha_to_one", True) or given[-1] == 0
        return given + [schedule.t_data if ends_on_data else 0.0], dict(zip(given, given))
    times, labels = [], {}
    for k, sigma in enumerate(sigmas.double().tolist()):
        # a flow's sigma is its time s; elsewhere diffusers' sigma is sigma / alpha, a level
        if schedule.family == "flow":
            t = sigma
        else:
            t = schedule.t_data if sigma == 0 else schedule.time_of(Level.from_sigma(sigma).ac)
        if t > schedule.t_high:  # FlowMatchEuler's s = 1 holds no trace of the data: start at t_max
            t = schedule.t_max
        if not times or t != times[-1]:  # Heun's repeated sigmas are one time here
            times.append(float(t))
            if k < len(given):
                labels[float(t)] = given[k]
    return times, labels
