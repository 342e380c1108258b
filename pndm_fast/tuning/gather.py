"""Candidates scored together: one thread samples each, and their model calls share forwards.

Each candidate of a group runs `sample()` in its own thread on a `GatheredNet`; the r-th network call of every
candidate still sampling is answered by one forward of all their inputs, the rows concatenated. On a GPU a small
batch of selection noises leaves most of the card idle, so a group of 16 candidates costs about one candidate's
forwards; a candidate that ends (fewer calls) or fails leaves the group and the rest go on without it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch


class GatheredNet:
    """A network shared by `parties` threads: each call waits for the same call of every other party still
    sampling, then one forward answers them all. `leave()` when a party is done."""

    def __init__(self, net: Callable, parties: int):
        self.net, self.live, self.forwards = net, parties, 0
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
        """One forward of every waiting call (the lock is held: every live party is waiting)."""
        calls, self._waiting = self._waiting, []
        rows = [len(x) for x, *_ in calls]
        try:
            first = calls[0][2]
            kwargs = {key: torch.cat([c[2][key] for c in calls]) if _per_row(value, rows[0]) else value
                      for key, value in first.items()}
            out = self.net(torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]), **kwargs)
            self.forwards += 1
            for (*_, answer), part in zip(calls, torch.split(out, rows)):
                answer["out"] = part
        except Exception as error:  # noqa: BLE001 - every party of the forward gets its error
            for *_, answer in calls:
                answer["error"] = error
        self._turn.notify_all()


def _per_row(value, rows: int) -> bool:
    """A keyword argument with a row per input row (class labels, prompt embeddings) is concatenated too."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and len(value) == rows


def score_together(run: Callable, net: Callable, candidates: list, group: int) -> list:
    """[run(candidate, shared_net) for candidate in candidates], `group` at a time in threads on one GatheredNet
    of `net` each. `run` samples with the net it is given and returns the candidate's score."""
    scores = []
    for start in range(0, len(candidates), group):
        chunk = candidates[start:start + group]
        shared = GatheredNet(net, len(chunk))

        def one(candidate):
            try:
                return run(candidate, shared)
            finally:
                shared.leave()

        with ThreadPoolExecutor(len(chunk)) as pool:
            scores += list(pool.map(one, chunk))
    return scores
