"""The open engine on a real GPU: guidance, x0 models and non-uniform grids through the fused (Triton) and
CUDA-graph backends, and threads replaying graphs. Skipped without CUDA."""

import copy

import numpy as np
import pytest
import torch
from conftest import in_threads, relative_l2
from test_open_engine import TINY_DDIM, Conditional

from pndm_fast import Denoiser, Schedule, build_model, engine, sample, sampling, set_cache_limit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})


@pytest.fixture(autouse=True)
def exact_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    model = build_model(TINY_DDIM).eval().requires_grad_(False)
    return model.cuda(), copy.deepcopy(model).double().cuda()


@pytest.mark.parametrize("backend", ["fused", "graph"])
@pytest.mark.parametrize("method,timesteps", [("DDIM", "uniform"), ("F-PNDM", "karras"), ("DPM-Solver++2M", "logsnr")])
def test_guided_gpu_backends_stay_within_twice_the_float32_reference(nets, backend, method, timesteps):
    model, model64 = nets
    labels = torch.tensor([0, 4, 9], device="cuda")
    noise = torch.randn(3, 1, 8, 8, device="cuda")

    def guided(net):
        return Denoiser(Conditional(net), cond={"y": labels}, uncond={"y": torch.full_like(labels, -1)}, guidance=3.0)

    with torch.no_grad():
        truth = sample(guided(model64), noise.double(), LINEAR, method, 10, "reference", True, timesteps=timesteps)
        baseline = sample(guided(model), noise, LINEAR, method, 10, "reference", True, timesteps=timesteps)
        ours = sample(guided(model), noise, LINEAR, method, 10, backend, True, timesteps=timesteps)
    for step in range(1, len(truth)):
        assert relative_l2(ours[step], truth[step]) <= 2 * relative_l2(baseline[step], truth[step]) + 1e-7


@pytest.fixture
def runner_cache():
    """The default cache (whatever PNDM_FAST_RUNNER_CACHE says), so that an idle runner is kept for reuse."""
    set_cache_limit(8)
    yield
    set_cache_limit(None)


@pytest.mark.parametrize("backend", ["fused", "graph"])
@pytest.mark.parametrize("method,timesteps", [("DDIM", "uniform"), ("F-PNDM", "karras")])
def test_one_runner_replays_its_captured_graph_with_new_labels(nets, backend, method, timesteps, monkeypatch,
                                                               runner_cache):
    """Calls with new Denoisers over one network reuse one runner (one capture with backend graph), and each
    call's labels are the ones its result follows: the conditioning is loaded at each call, not baked in.
    Fails if the conditioning is baked in at capture (planted: Caller.load not copying the new labels into its
    static inputs), and if each call builds a runner of its own (planted: checkin not keeping the runner)."""
    model, _ = nets
    built, captured = [], []

    class CountedRunner(engine.PlanRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    class CountedGraph(engine.GraphRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(self)

    monkeypatch.setattr(sampling, "PlanRunner", CountedRunner)
    monkeypatch.setattr(sampling, "GraphRunner", CountedGraph)
    net = Conditional(model)  # one network for every call: the runners are cached per network
    noise = torch.randn(3, 1, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    label_sets = [torch.tensor(v, device="cuda") for v in ([0, 4, 9], [1, 2, 3], [9, 9, 0])]

    def guided(labels):
        return Denoiser(net, cond={"y": labels}, uncond={"y": torch.full_like(labels, -1)}, guidance=3.0)

    with torch.no_grad():
        runs = [sample(guided(labels), noise, LINEAR, method, 10, backend, timesteps=timesteps)
                for labels in label_sets]
        expected = [sample(guided(labels), noise, LINEAR, method, 10, "reference", timesteps=timesteps)
                    for labels in label_sets]
    assert len(built) == 1, f"{len(built)} runners built for one network, plan and shape"
    assert len(captured) == (1 if backend == "graph" else 0)
    for labels, ours, want in zip(label_sets, runs, expected):
        assert relative_l2(ours, want) < 1e-4, f"labels {labels.tolist()}"
    # and the labels matter: the runs differ from each other far beyond that tolerance
    assert relative_l2(runs[0], runs[1]) > 1e-2 and relative_l2(runs[1], runs[2]) > 1e-2


def test_threads_replaying_graphs_of_one_model_get_their_own_results(nets):
    model, _ = nets
    noises = [torch.randn(2, 1, 8, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(s))
              for s in range(4)]
    with torch.no_grad():
        alone = [sample(model, n, LINEAR, "F-PNDM", 6, "graph") for n in noises]

    def work(i):
        with torch.no_grad():
            return sample(model, noises[i], LINEAR, "F-PNDM", 6, "graph")

    results = in_threads(work, 4)
    for i in range(4):
        assert torch.equal(results[i], alone[i])


@pytest.mark.parametrize("method", ["Euler-a", "DPM-Solver++2M-SDE", "DDIM:eta=0.5",
                                    "UniPC-bh2:threshold=0.995"])
def test_the_graph_replays_fresh_noise_and_thresholding_as_the_eager_run(nets, method):
    """Draws are static buffers filled before each replay, thresholding a captured in-place step: the graph gives
    the eager fused run's images, a new seed gives new ones, and the same seed the same ones."""
    model, _ = nets
    noise = torch.randn(3, 1, 8, 8, device="cuda")
    with torch.no_grad():
        eager = sample(model, noise, LINEAR, method, 8, "fused", seed=5)
        graph = [sample(model, noise, LINEAR, method, 8, "graph", seed=s) for s in (5, 6, 5)]
    assert torch.allclose(graph[0], eager, atol=1e-5)
    assert torch.equal(graph[0], graph[2])
    if "threshold" not in method:
        assert (graph[0] - graph[1]).abs().max() > 1e-3


def test_a_watched_run_takes_the_eager_backend_on_cuda(nets):
    model, _ = nets
    noise = torch.randn(2, 1, 8, 8, device="cuda")
    steps = []
    with torch.no_grad():
        x = sample(model, noise, LINEAR, "DDIM", 5, callback=lambda i, t, x, x0: steps.append(i))
        assert torch.equal(x, sample(model, noise, LINEAR, "DDIM", 5, "fused"))
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("method", ["F-PNDM", "DPM-Solver++2M-SDE"])
def test_a_watched_graph_replays_one_graph_per_step_as_the_eager_run(nets, method, runner_cache):
    """backend 'graph' with a callback replays one graph per step and runs the callback between them: the callback
    sees the eager fused run's states and data predictions, steers the run as there (it halves x after step 1),
    and a second call replays the cached step graphs with the same result."""
    model, _ = nets
    noise = torch.randn(2, 1, 8, 8, device="cuda")

    def watched(backend):
        seen = []

        def callback(i, t, x, x0):
            seen.append((i, t, x.clone(), x0.clone()))
            if i == 1:
                x.mul_(0.5)

        with torch.no_grad():
            out = sample(model, noise, LINEAR, method, 6, backend, True, seed=3, callback=callback)
        return out, seen

    eager, seen_eager = watched("fused")
    for out, seen in (watched("graph"), watched("graph")):
        assert torch.allclose(out, eager, atol=1e-5)
        assert [(i, t) for i, t, _, _ in seen] == [(i, t) for i, t, _, _ in seen_eager]
        for (_, _, x, x0), (_, _, x_eager, x0_eager) in zip(seen, seen_eager):
            assert torch.allclose(x, x_eager, atol=1e-5) and torch.allclose(x0, x0_eager, atol=1e-4)
    with torch.no_grad():
        unsteered = sample(model, noise, LINEAR, method, 6, "graph", seed=3)
    assert (unsteered - eager[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["DDIM", "Euler-a"])
def test_the_graph_blends_the_mask_as_the_eager_run(nets, method):
    """Inpainting's blend is a captured plan step reading static mask inputs: the graph gives the eager fused run's
    images, with the kept pixels the image's exactly, and a new image changes them on replay."""
    model, _ = nets
    noise = torch.randn(2, 1, 8, 8, device="cuda")
    image = torch.rand(2, 1, 8, 8, device="cuda") * 2 - 1
    mask = torch.zeros(1, 1, 8, 8, device="cuda")
    mask[..., :4] = 1
    with torch.no_grad():
        eager = sample(model, noise, LINEAR, method, 8, "fused", init_image=image, mask=mask, seed=2)
        graph = sample(model, noise, LINEAR, method, 8, "graph", init_image=image, mask=mask, seed=2)
        other = sample(model, noise, LINEAR, method, 8, "graph", init_image=-image, mask=mask, seed=2)
    assert torch.allclose(graph, eager, atol=1e-5) and torch.equal(graph[..., 4:], image[..., 4:])
    assert torch.equal(other[..., 4:], -image[..., 4:])


@pytest.mark.parametrize("method", ["Euler-a", "DDIM:eta=1"])
def test_a_stochastic_run_on_cuda_draws_on_the_device_and_every_backend_agrees(nets, method, monkeypatch):
    """No draw is made on the host (planted: the CPU generator called, fails), the draws are kernels/normal.py's
    Philox and Box-Muller (against its float64 definition), and every backend samples with the same ones."""
    from test_seeds import philox_normals

    from pndm_fast import noise as noise_module
    from pndm_fast.seeds import derived_seeds

    draws = noise_module.step_noise(4, [0, 7], 3, (1, 8, 8), "cuda")
    seeds = derived_seeds([(4, i, noise_module.STEP_STREAM, k) for k in range(3) for i in (0, 7)])
    want = torch.from_numpy(np.stack([philox_normals(s, 64) for s in seeds])).view(3, 2, 1, 8, 8)
    assert draws.device.type == "cuda" and (draws.cpu().double() - want).abs().max() < 5e-6

    def on_the_host(*args):
        raise AssertionError("a CUDA run drew its noise on the host")

    monkeypatch.setattr(noise_module, "_draws", on_the_host)
    model, _ = nets
    noise = torch.randn(2, 1, 8, 8, device="cuda")
    with torch.no_grad():
        runs = {b: sample(model, noise, LINEAR, method, 8, b, seed=4) for b in ("reference", "torch", "fused", "graph")}
    for backend in ("torch", "fused", "graph"):
        assert relative_l2(runs[backend], runs["reference"]) < 1e-5, backend
