"""Many batches in a row: the runner cache hits re-used shapes, stays within its limit, and frees what it evicts
(buffers at once, by reference count) and every runner of a model that is gone."""

import gc
import itertools
import weakref

import pytest
import torch
from conftest import torch_threads

from pndm_fast import (
    Schedule,
    UserError,
    build_model,
    sample,
    sampling,
    set_cache_limit,
)
from pndm_fast.engine import PlanRunner

SCHEDULE = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
# Takes any even H and W, so one model meets many shapes.
TINY_IDDPM = {"Model": {"struc": "iDDPM", "in_channels": 1, "model_channels": 32, "out_channels": 2,
                        "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0, "channel_mult": [1, 2],
                        "conv_resample": True, "use_scale_shift_norm": True, "num_heads": 1,
                        "num_heads_upsample": 1}}


@pytest.fixture(autouse=True)
def one_thread_and_default_limit():
    """Tiny models: one thread (a second only waits on the first on a busy machine); the cache limit and the
    environment variable restored afterwards."""
    with torch_threads(1):
        yield
    set_cache_limit(None)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(TINY_IDDPM).eval().requires_grad_(False)


@pytest.fixture
def no_gc():
    """Freed must mean freed by reference count, at once: the cycle collector stays off during the test."""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


@pytest.fixture
def built(monkeypatch):
    """Every runner sample() builds, held weakly: alive means something still holds it."""
    runners = weakref.WeakSet()

    class Tracked(PlanRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runners.add(self)

    monkeypatch.setattr(sampling, "PlanRunner", Tracked)
    return runners


def run(model, batch, size, method="DDIM", backend="fused", steps=2):
    return sample(model, torch.randn(batch, 1, size, size), SCHEDULE, method, steps, backend)


def cached(model) -> list:
    """The model's idle runners, least recently used first."""
    return [runner for idle in sampling._RUNNERS.get(model, {}).values() for runner in idle]


def test_a_reused_shape_hits_the_cache(model, built):
    set_cache_limit(4)
    run(model, 2, 4)
    first = cached(model)
    run(model, 1, 6)
    run(model, 2, 4)
    assert len(built) == 2 and cached(model)[-1] is first[0]  # the same runner, now most recently used
    run(model, 2, 4, method="F-PNDM")  # another plan is another runner
    assert len(built) == 3


def test_an_evicted_runner_and_its_buffers_are_freed_at_once(model, built, no_gc):
    set_cache_limit(2)
    run(model, 1, 4)
    oldest = cached(model)[0]
    runner, buffer = weakref.ref(oldest), weakref.ref(oldest.x)
    del oldest
    run(model, 1, 6)
    assert runner() is not None  # still cached: two runners fit
    run(model, 1, 8)
    assert runner() is None and buffer() is None
    assert len(built) == 2 == len(cached(model))


def test_live_runners_never_exceed_the_limit_over_a_soak(model, built, no_gc):
    limit = 3
    set_cache_limit(limit)
    shapes = list(itertools.product([1, 2], [4, 6, 8]))  # 6 shapes, 2 methods, 2 backends: 24 keys
    for _ in range(2):
        for (batch, size), method, backend in itertools.product(shapes, ["DDIM", "F-PNDM"], ["fused", "torch"]):
            x = run(model, batch, size, method, backend)
            assert x.shape == (batch, 1, size, size) and torch.isfinite(x).all()
            assert len(built) <= limit and len(cached(model)) <= limit
    assert len(cached(model)) == limit  # (other tests' models, still alive, may hold runners of their own)


def test_runners_die_with_their_model(built):
    torch.manual_seed(0)
    model = build_model(TINY_IDDPM).eval()
    run(model, 1, 4)
    run(model, 2, 4, backend="torch")
    assert len(built) == 2
    alive = weakref.ref(model)
    del model
    gc.collect()  # a model is a tree of modules, freed by the collector (no runner holds it)
    assert alive() is None and len(built) == 0


def test_lowering_the_limit_trims_at_once_and_zero_keeps_none(model, built, no_gc):
    set_cache_limit(8)
    for size in (4, 6, 8, 10):
        run(model, 1, size)
    assert len(cached(model)) == 4
    set_cache_limit(1)
    assert len(cached(model)) == 1 and len(built) == 1
    set_cache_limit(0)
    x = run(model, 1, 4)
    assert torch.isfinite(x).all() and cached(model) == [] and len(built) == 0


def test_the_limit_comes_from_the_environment_unless_set(monkeypatch):
    monkeypatch.setenv(sampling.CACHE_ENV, "3")
    assert sampling.cache_limit() == 3
    set_cache_limit(5)
    assert sampling.cache_limit() == 5
    set_cache_limit(None)
    monkeypatch.delenv(sampling.CACHE_ENV)
    assert sampling.cache_limit() == sampling.DEFAULT_CACHE_LIMIT
    monkeypatch.setenv(sampling.CACHE_ENV, "many")
    with pytest.raises(UserError, match=sampling.CACHE_ENV):
        sampling.cache_limit()
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(UserError, match="cache limit"):
            set_cache_limit(bad)


def test_a_runner_built_under_inference_mode_does_not_break_a_later_no_grad_call(model):
    noise = torch.randn(1, 1, 4, 4)
    with torch.inference_mode():
        first = sample(model, noise, SCHEDULE, "F-PNDM", 4, "fused")
    with torch.no_grad():
        second = sample(model, noise, SCHEDULE, "F-PNDM", 4, "fused")
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_evicted_graph_runners_are_freed_and_cuda_memory_stays_flat(built):
    torch.manual_seed(0)
    model = build_model(TINY_IDDPM).cuda().eval().requires_grad_(False)
    set_cache_limit(2)
    graphs = weakref.WeakSet()

    def churn():
        """Four graphs in turn through a cache of two: each captured, evicted, captured again."""
        for size in (24, 32, 8, 16):
            sample(model, torch.randn(2, 1, size, size, device="cuda"), SCHEDULE, "F-PNDM", 4, "graph")
            graphs.update(cached(model))
            assert len(graphs) <= 2 and len(built) <= 2
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what a freed graph's private pool gave back leaves the reserve here
        return torch.cuda.memory_reserved()

    after_one = churn()
    after_four = [churn() for _ in range(3)][-1]
    # The same two graphs are cached after each round; twelve more captures must not leave their pools behind
    # (each holds at least one 2 MiB segment).
    assert after_four <= after_one + 2 * 2**20, (after_one, after_four)
