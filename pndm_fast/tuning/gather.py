"""Candidates scored together: one thread samples each, and their model calls share forwards.

Each candidate of a group runs `sample()` in its own thread on a `GatheredNet`; the r-th network call of every
candidate still sampling is answered by one forward of all their inputs, the rows concatenated. On a GPU a small
batch of selection noises leaves most of the card idle, so a group of 16 candidates costs about one candidate's
forwards; a candidate that ends (fewer calls) or fails leaves the group and the rest go on without it.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class GatheredNet:
    """A network shared by `parties` threads: each call waits for the same call of every other party still
    sampling, then one forward answers them all. `leave()` when a party is done."""

    def __init__(self, net: Callable, parties: int, module: torch.nn.Module | None = None):
        # `module`: the torch module behind `net`, so that the sampler still sees its dtype, device and options
        self.net, self.module, self.live = net, module, parties
        self._turn = threading.Condition()
        self._waiting: list[tuple] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        answer: dict = {}
        with self._turn:
            self._waiting.append((x, t, kwargs, answer))
            if len(self._waiting) == self.live:
                self._answer()
            while not answer:
                self._turn.wait()
        if "error" in answer:
            raise answer["error"]
        return answer["out"]

    def leave(self) -> None:
        with self._turn:
            self.live -= 1
            if self._waiting and len(self._waiting) == self.live:
                self._answer()

    def _answer(self) -> None:
        """One forward of every waiting call (the lock is held: every live party is waiting). It may run in a party
        that is leaving, outside its sampling: inference mode is set here, as each party's own is per thread."""
        calls, self._waiting = self._waiting, []
        rows = [len(x) for x, *_ in calls]
        try:
            with torch.inference_mode():
                first = calls[0][2]
                if all(_per_row(value, rows[0]) or all(_same(c[2][key], value) for c in calls)
                       for key, value in first.items()):
                    kwargs = {key: torch.cat([c[2][key] for c in calls]) if _per_row(value, rows[0]) else value
                              for key, value in first.items()}
                    out = self.net(torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]), **kwargs)
                    parts = torch.split(out, rows)
                else:  # arguments that cannot be stacked (nested dicts, lists): one forward per party
                    parts = [self.net(x, t, **kwargs) for x, t, kwargs, _ in calls]
            for (*_, answer), part in zip(calls, parts):
                answer["out"] = part
        except BaseException as error:  # every party of the forward gets its error, even an interrupt's
            for *_, answer in calls:
                answer["error"] = error
        finally:
            self._turn.notify_all()


def _per_row(value, rows: int) -> bool:
    """A keyword argument with a row per input row (class labels, prompt embeddings) is concatenated too."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == rows


def _same(a, b) -> bool:
    """One value for every party: the same object, or equal tensors (each party's runner keeps its own copy)."""
    if a is b:
        return True
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
        a.dtype == b.dtype and bool(torch.equal(a, b))


def score_together(run: Callable, net: Callable, candidates: list, group: int,
                   module: torch.nn.Module | None = None, device: torch.device | None = None) -> list:
    """[run(candidate, shared_net) for candidate in candidates], `group` at a time in threads on one GatheredNet
    of `net` (behind it `module`) each. `run` samples with the net it is given and returns the candidate's score;
    each thread works on `device` (CUDA's current device is per thread)."""
    scores = []
    for start in range(0, len(candidates), group):
        chunk = candidates[start:start + group]
        shared = GatheredNet(net, len(chunk), module)

        def one(candidate):
            on_device = torch.cuda.device(device) if device is not None and device.type == "cuda" else \
                contextlib.nullcontext()
            try:
                with on_device:
                    return run(candidate, shared)
            finally:
                shared.leave()

        with ThreadPoolExecutor(len(chunk)) as pool:
            scores += list(pool.map(one, chunk))
    return scores
