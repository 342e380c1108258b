"""diffusers' schedulers read as pndm_fast's descriptions (docs/diffusers.md): the noise schedule, what the network
predicts and the time it reads, and the pndm_fast method that computes the same steps. Reads configs only: diffusers
itself is not imported here.

A config pndm_fast cannot represent (a schedule reaching zero signal, a stochastic flow sampler, EDM with another
sigma_data, ...) is refused with one line naming the setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .adapters import DIFFUSERS_PREDICTIONS
from .continuous import EDMSchedule, FlowSchedule
from .errors import UserError
from .levels import SIGMA_DATA
from .schedule import NoiseSchedule, Schedule, make_betas

# diffusers' beta_schedule name -> pndm_fast.schedule.make_betas' kind (the same formulas: scaled_linear is
# linear in sqrt(beta), squaredcos_cap_v2 is the cosine alpha_bar of Nichol & Dhariwal capped at beta 0.999)
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "quad", "squaredcos_cap_v2": "cosine"}
VP_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
              "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
              "UniPCMultistepScheduler", "DEISMultistepScheduler")
FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)
EDM_CLASSES = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
CLASSES = VP_CLASSES + FLOW_CLASSES + EDM_CLASSES
# settings whose only value pndm_fast can represent: (class prefix or "", key, the representable value)
REFUSED = (("", "rescale_betas_zero_snr", False, "a schedule that reaches zero signal"),
           ("", "timestep_type", "discrete", "continuous timesteps of a v-prediction Euler"),
           ("", "invert_sigmas", False, "inverted sigmas (Mochi)"),
           ("", "stochastic_sampling", False, "FlowMatchEuler's stochastic sampling"),
           ("", "use_dynamic_shifting", False, "a dynamic shift (give it with set_timesteps(mu=...))"),
           ("EDM", "sigma_data", SIGMA_DATA, f"EDM's preconditioning with sigma_data other than {SIGMA_DATA}"))


@dataclass(frozen=True)
class DiffusersReading:
    """What a diffusers scheduler config says, in pndm_fast's words: the schedule, the network's prediction and
    time input, and `method`, the method computing the scheduler's own steps (None where none does)."""

    class_name: str
    schedule: NoiseSchedule
    prediction: str
    time_input: str
    method: str | None


def scheduler_config(scheduler) -> tuple[str, dict]:
    """(class name, config) of a diffusers scheduler, or of a config dict that names its class (_class_name)."""
    if isinstance(scheduler, Mapping):
        config = dict(scheduler)
        name = config.get("_class_name")
        if not isinstance(name, str):
            raise UserError("a diffusers scheduler config needs its _class_name (e.g. DDIMScheduler); pass the "
                            "scheduler itself or its .config")
        return name, config
    config = getattr(scheduler, "config", None)
    if config is None:
        raise UserError(f"expected a diffusers scheduler or its config, got {type(scheduler).__name__}")
    config = dict(config)
    if "base_class" in config:  # a PlanScheduler: the config of the scheduler it replaced
        return config.pop("base_class"), {k: v for k, v in config.items() if k != "method"}
    return type(scheduler).__name__, config


def read_scheduler(scheduler, dynamic_shift: float | None = None) -> DiffusersReading:
    """The reading of a diffusers scheduler (or its config): UserError, one line, for what cannot be represented.
    `dynamic_shift` is the flow shift of a run whose scheduler shifts dynamically (exp(mu))."""
    name, config = scheduler_config(scheduler)
    if name not in CLASSES:
        raise UserError(f"{name} is not a scheduler pndm_fast reads: expected one of {', '.join(CLASSES)}")
    for prefix, key, value, what in REFUSED:
        if name.startswith(prefix) and key in config and config[key] != value and not (
                key == "use_dynamic_shifting" and dynamic_shift is not None):
            raise UserError(f"{name} with {key}={config[key]!r}: {what} cannot be represented in pndm_fast")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in DIFFUSERS_PREDICTIONS:
        raise UserError(f"{name} has prediction_type {prediction!r}: expected one of "
                        f"{', '.join(DIFFUSERS_PREDICTIONS)}")
    flow = name in FLOW_CLASSES or config.get("use_flow_sigmas", False)
    if flow:
        if name not in FLOW_CLASSES and prediction != "flow_prediction":
            raise UserError(f"{name} with use_flow_sigmas needs prediction_type flow_prediction, got {prediction!r}")
        shift = dynamic_shift or config.get("shift", config.get("flow_shift", 1.0))
        schedule = FlowSchedule(shift, int(config.get("num_train_timesteps", 1000)))
        return DiffusersReading(name, schedule, "flow", "1000t", _method(name, config))
    if prediction == "flow_prediction":
        raise UserError(f"{name} has prediction_type flow_prediction without use_flow_sigmas: a flow model "
                        "needs the flow schedule (use_flow_sigmas=True)")
    if name in EDM_CLASSES:
        if prediction != "epsilon":
            raise UserError(f"{name} with prediction_type {prediction!r}: pndm_fast reads EDM's network as "
                            "epsilon-preconditioned only")
        schedule = EDMSchedule(config.get("sigma_min", 0.002), config.get("sigma_max", 80.0), config.get("rho", 7.0))
        return DiffusersReading(name, schedule, "edm", "c_noise", _method(name, config))
    betas = getattr(scheduler, "betas", None) if not isinstance(scheduler, dict) else None
    schedule = Schedule(betas.double().numpy() if betas is not None else betas_of(name, config),
                        description=f"{name}'s betas")
    return DiffusersReading(name, schedule, DIFFUSERS_PREDICTIONS[prediction], "t", _method(name, config))


def betas_of(name: str, config: dict) -> np.ndarray:
    """The betas of a VP scheduler config, as diffusers computes them: trained_betas as listed, else
    beta_schedule from beta_start, beta_end and num_train_timesteps."""
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2 or not np.all((betas > 0) & (betas < 1)):
            raise UserError(f"{name} has trained_betas that are not a list of at least two numbers in (0, 1)")
        return betas
    kind = config.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise UserError(f"{name} has beta_schedule {kind!r}: expected one of {', '.join(BETA_SCHEDULES)}, or "
                        "trained_betas")
    steps, start, end = (config.get("num_train_timesteps", 1000), config.get("beta_start", 0.0001),
                         config.get("beta_end", 0.02))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (steps, start, end))
    if not (numbers and isinstance(steps, int) and steps >= 2 and 0 < start <= end < 1):
        raise UserError(f"{name} has num_train_timesteps {steps!r}, beta_start {start!r}, beta_end {end!r}: "
                        "expected an integer >= 2 and 0 < beta_start <= beta_end < 1")
    if kind == "squaredcos_cap_v2":  # float64 formula, rounded to float32 by the schedule as by diffusers
        return make_betas("cosine", steps)
    # diffusers' own float32 linspace, whose rounding differs from a float64 one's in the last bit
    root = 0.5 if kind == "scaled_linear" else 1.0
    return (torch.linspace(start**root, end**root, steps, dtype=torch.float32) ** (1 / root)).double().numpy()


def _method(name: str, config: dict) -> str | None:
    """The pndm_fast method computing the scheduler's steps (options that depend on the step count, such as
    diffusers' lower_order_final below 15 steps, are set by `method_for_steps`)."""
    order = int(config.get("solver_order", 2))
    if name in ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"):
        return "DDIM"  # Euler in sigma (or in the flow's s) is DDIM's step
    if name == "DDPMScheduler":
        return "DDIM:eta=1"
    if name == "EulerAncestralDiscreteScheduler":
        return "Euler-a"
    if name == "HeunDiscreteScheduler":
        return "Heun"
    if name == "UniPCMultistepScheduler" and config.get("predict_x0", True) and not config.get("disable_corrector"):
        return f"UniPC-{config.get('solver_type', 'bh2')}:order={order}"
    if name == "DEISMultistepScheduler":
        return f"DEIS:order={order}"
    if name in ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler"):
        kind = config.get("algorithm_type", "dpmsolver++")
        if kind == "dpmsolver++" and order in (2, 3) and config.get("solver_type", "midpoint") == "midpoint":
            return f"DPM-Solver++{order}M"
        if kind == "sde-dpmsolver++" and order in (1, 2):
            return f"DPM-Solver++2M-SDE:order={order}"
    return None  # PNDM's PLMS, noise-prediction DPM-Solver: no pndm_fast method takes exactly their steps


def method_for_steps(reading: DiffusersReading, config: dict, steps: int) -> str | None:
    """`reading.method` with diffusers' step-count-dependent options: its multistep solvers lower their order at
    the end only below 15 steps (UniPC at any count)."""
    method = reading.method
    if method is None or not method.startswith(("DPM-Solver++", "DEIS")):
        return method
    lower = bool(config.get("lower_order_final", True)) and steps < 15
    sep = "," if ":" in method else ":"
    return f"{method}{sep}lower_order_final={'true' if lower else 'false'}"


def schedule_from_diffusers(scheduler) -> NoiseSchedule:
    """The noise schedule of a diffusers scheduler or its config: the betas of DDPM, DDIM, PNDM, DPM-Solver, Euler,
    Heun, UniPC and DEIS, the flow of FlowMatchEuler (and use_flow_sigmas), EDM's sigmas; what cannot be represented
    is refused with one line."""
    return read_scheduler(scheduler).schedule
