"""Applies the coefficient steps of `pndm_fast.multistep` to tensors: a plain float64 executor for the tests and
the accuracy script (the sampling engine executes the same weights in its own kernels)."""

from __future__ import annotations

import torch

from pndm_fast.multistep import EPS, Step


def run_steps(steps: list[Step], x: torch.Tensor, grid, eps_fn, prediction: str):
    """Returns (states, corrected): states[i] is the state the model is called at for i < S and the final state
    for i = S; corrected lists the "x_corrected" states (UniPC; empty otherwise)."""
    acs = [torch.tensor(float(a), dtype=torch.float64) for a in grid]
    states, corrected, history = [x], [], []
    base = x  # the input "x": the step's start state, or for UniPC the last corrected state
    for i, step in enumerate(steps):
        eps = eps_fn(states[-1], acs[i])
        history.insert(0, eps if prediction == EPS else (states[-1] - (1 - acs[i]).sqrt() * eps) / acs[i].sqrt())
        inputs = {"x": base, **{f"D{k}": d for k, d in enumerate(history)}}

        def combine(update):
            return sum(w * inputs[name] for name, w in update.weights.items())

        if "x_corrected" in step.updates:
            corrected.append(combine(step.updates["x_corrected"]))
        states.append(combine(step.updates["x_next"]))
        base = corrected[-1] if corrected else states[-1]
    return states, corrected
