"""The tuner: its teacher against the exact ODE of a mixture, its optimiser on a problem whose best grid is known,
selection that never sees the validation noises, and profiles that round-trip, run what they say, and are refused
for another model, schedule or guidance scale."""

import copy
import itertools
import math

import numpy as np

import pytest
import torch
from mixture import GaussianMixture, MixtureEps, ring_2d

from pndm_fast import Denoiser, Schedule, UserError, make_grid, sample
from pndm_fast.levels import Level
from pndm_fast.tuning import Profile, Teacher, dynamic, tune
from pndm_fast.tuning.search import Candidate, optimise_times
from pndm_fast.tuning.teacher import relative_error

LINEAR = Schedule.from_config({"type": "linear", "beta_start": 1e-4, "beta_end": 2e-2, "diffusion_step": 1000})
SMALL = dict(methods=["DDIM", "DPM-Solver++2M", "UniPC-bh2:order=2"], families=("logsnr", "karras", "linspace"),
             screen=4, evaluations=8, teacher_steps=100, peers=False)


def noises(n, seed):
    return torch.randn(n, 2, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def ring():
    return MixtureEps(ring_2d(), LINEAR)


def test_the_teacher_and_its_error_estimate_against_the_exact_ode(ring):
    import accuracy_peers as ap

    noise = noises(16, 1)
    teacher = Teacher.solve(ring, noise, LINEAR, 50, backend="torch")  # 100 steps, checked against 50
    sigma_max = Level.of(LINEAR.alpha(LINEAR.num_steps - 1)).rho
    exact = ap.exact_flow(ring_2d(), noise.reshape(16, -1), sigma_max, [0.0])[0.0]
    actual = relative_error(teacher.x, exact.reshape(teacher.x.shape))
    assert teacher.steps == 100 and actual < 1e-3
    # the estimate is of the right size: within 10x of the true error either way
    assert actual / 10 < teacher.error < 10 * actual, (teacher.error, actual)


def test_the_optimiser_finds_a_known_best_grid():
    """Planted: a pattern search that never moves the first call, or that moves calls past each other, fails."""
    target = [900.0, 600.0, 350.0, 120.0, 30.0]
    target_lams = [Level.of(LINEAR.alpha(t)).lam for t in target]

    def distance(candidate: Candidate) -> float:
        calls = candidate.grid.times[:-1]
        assert all(b < a for a, b in zip(calls, calls[1:]))
        return sum((Level.of(LINEAR.alpha(t)).lam - lam) ** 2 for t, lam in zip(calls, target_lams))

    start = Candidate("DDIM", make_grid(LINEAR, "logsnr", 5), "start")
    best, value = optimise_times(distance, start, LINEAR, evaluations=400)
    assert value < 1e-4 * distance(start)
    assert best.grid.times[:-1] == pytest.approx(tuple(target), abs=2.0)


def test_the_least_cost_path_is_the_best_of_every_path():
    """Against every path, enumerated. Planted: a path read back one step off, the emphasis on the first steps."""
    rng = np.random.default_rng(0)
    n = 9
    costs = np.triu(rng.uniform(0.1, 1.0, (n, n + 1)), k=1)
    costs[costs == 0] = np.inf
    errors = dynamic.LocalErrors(tuple(float(t) for t in range(900, 0, -100)), costs, 1.0, 0)
    for count, emphasis in itertools.product(range(1, 6), (1.0, 1.3)):
        def total(path):
            nodes = list(path) + [n]
            return sum(emphasis ** k * costs[a, b] for k, (a, b) in enumerate(zip(nodes, nodes[1:])))

        best = min(((0,) + rest for rest in itertools.combinations(range(1, n), count - 1)), key=total)
        assert errors.calls(count, emphasis) == tuple(errors.times[i] for i in best), (count, emphasis)


def test_a_local_error_is_the_error_it_leaves_in_the_data_for_gaussian_data():
    """For data N(0, s^2 I) the ODE is linear: x_t = r_t / r_T x_T with r_t = sqrt(alpha^2 s^2 + sigma^2). So the
    cost of a step from candidate i to j must equal the relative error in the data of one DDIM step from the exact
    x_i to t_j followed by the exact flow to the data. Planted: an unweighted local error, a wrong DDIM step."""
    s, d = 0.5, 16
    model = MixtureEps(GaussianMixture.create([1.0], torch.zeros(1, d), [s], (d, 1, 1)), LINEAR)
    noise = torch.randn(64, d, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    noise = (noise - noise.mean(0)) / noise.std(0, unbiased=False)  # the data's spread is then exactly s
    errors = dynamic.measure(Denoiser(model), LINEAR, noise, 100, backend="torch")

    def level(t):
        lv = Level.of(LINEAR.alpha(t))
        return lv.alpha, lv.sigma, math.sqrt(lv.alpha ** 2 * s ** 2 + lv.sigma ** 2)

    z = noise.flatten(1) / level(LINEAR.t_max)[2]  # the data the exact flow reaches is s z
    checked = 0
    for i, j in [(0, 1), (0, 20), (3, 30), (10, 11), (25, 40), (40, 60), (5, len(errors.times))]:
        a_i, sig_i, r_i = level(errors.times[i])
        x_i = r_i * z
        x0_i, eps_i = a_i * s ** 2 / r_i ** 2 * x_i, sig_i / r_i ** 2 * x_i
        if j == len(errors.times):
            reached = x0_i
        else:
            a_j, sig_j, r_j = level(errors.times[j])
            reached = s / r_j * (a_j * x0_i + sig_j * eps_i)
        expected = float(((reached - s * z).norm(dim=1) / (s * z).norm(dim=1)).mean())
        assert errors.costs[i, j] == pytest.approx(expected, rel=2e-2, abs=1e-6), (i, j)
        checked += expected > 1e-3
    assert checked >= 5
    assert errors.forwards > 0 and len(errors.times) >= 40


def test_selection_never_sees_the_validation_noises(ring):
    selection, validation = noises(8, 2), noises(8, 3)
    runs = {"selection": 0, "validation": 0}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ring

        def forward(self, x, t):
            # candidates scored together come as one batch of their runs, whose first calls all see their noise
            chunks = x.split(len(selection))
            for name, batch in (("selection", selection), ("validation", validation)):
                if all(rows.shape == batch.shape and torch.equal(rows, batch) for rows in chunks):
                    runs[name] += len(chunks)
            return self.inner(x, t)

    profile = tune(Spy(), LINEAR, [4, 6], selection, validation, backend="torch", finalists=2, **SMALL)
    # the teacher runs on both sets together; apart from it only each budget's (at most 2) finalists and auto's
    # static choice see the validation noises, and everything before them runs on the selection noises
    assert 2 <= runs["validation"] <= 2 * 3 and runs["selection"] > 20, runs
    for budget in (4, 6):
        entry = profile.budgets[budget]
        assert entry["model_calls"] <= budget and entry["error"] < 0.2


def test_a_profile_round_trips_runs_its_choice_and_refuses_another_model(ring, tmp_path):
    selection, validation = noises(8, 4), noises(8, 5)
    profile = tune(ring, LINEAR, [5], selection, validation, backend="torch", **SMALL)
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded.budgets == profile.budgets and loaded.model == profile.model
    method, grid = loaded.choice(LINEAR, 5)
    x = noises(4, 6)
    theirs = sample(ring, x, LINEAR, method, backend="torch", timesteps=grid)
    ours = sample(ring, x, LINEAR, "auto", model_calls=7, backend="torch", profile=loaded)  # 7 takes the 5 entry
    assert torch.equal(ours, theirs)
    # the validated error it reports is what its choice scores against an independent teacher on those noises
    truth = Teacher.solve(ring, validation, LINEAR, 100, backend="torch").x
    chosen = sample(ring, validation, LINEAR, method, backend="torch", timesteps=grid)
    assert math.isclose(relative_error(chosen, truth), loaded.budgets[5]["error"], rel_tol=1e-6)

    other = MixtureEps(ring_2d(), LINEAR)
    with torch.no_grad():
        other.dtype_anchor.add_(1.0)  # other weights, the same function
    for model, schedule, match in [
        (other, LINEAR, "another model"),
        (ring, Schedule.from_config({"type": "cosine", "diffusion_step": 1000}), "another noise schedule"),
        (Denoiser(ring, cond={}, uncond={}, guidance=2.0), LINEAR, "guidance 1"),
    ]:
        with pytest.raises(UserError, match=match):
            sample(model, x, schedule, "auto", model_calls=5, backend="torch", profile=loaded)
    with pytest.raises(UserError, match="none at or below 4"):
        loaded.choice(LINEAR, 4)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a pndm_fast tuning profile"):
        Profile.load(tmp_path / "bad.json")


def test_the_bundled_digits_model_samples_auto_with_its_own_profile():
    from pndm_fast import pretrained
    from pndm_fast.auto import choose
    from pndm_fast.tuning.profile import bundled_profile

    model, schedule = pretrained("digits")
    profile = bundled_profile(model, schedule)
    assert profile is not None and profile.info["config"] == "digits"
    assert {4, 5, 6, 8, 10} <= set(profile.budgets)
    for entry in profile.budgets.values():  # never worse than diffusers' best on its noises
        assert entry["error"] <= entry["diffusers"]["error"]
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    for budget in (4, 7, 10):
        method, grid = profile.choice(schedule, budget)
        assert method_calls(method, grid) <= budget
        with torch.inference_mode():
            assert torch.equal(sample(model, x, schedule, "auto", model_calls=budget),
                               sample(model, x, schedule, method, timesteps=grid))
    # other weights: no profile applies, and auto runs its table
    model = copy.deepcopy(model)
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    table_method, table_grid = choose(schedule, 6)
    with torch.inference_mode():
        assert torch.equal(sample(model, x, schedule, "auto", model_calls=6),
                           sample(model, x, schedule, table_method.name, timesteps=table_grid))


def test_the_guided_digits_model_has_a_profile_per_guidance_scale():
    """digits-cond ships profiles at guidance 1 and 2 (docs/tuning.md); each scale finds its own, and another
    scale none (auto's table), in Python and on the command line."""
    from pndm_fast import Denoiser, pretrained
    from pndm_fast.tuning.profile import bundled_profile, bundled_profile_named

    model, schedule = pretrained("digits-cond")
    labels = torch.arange(3)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    found = {}
    for guidance in (1.0, 2.0, 3.0):
        guided = Denoiser(model, cond={"y": labels}, uncond={"y": torch.full_like(labels, 10)}, guidance=guidance)
        found[guidance] = bundled_profile(guided, schedule)
        named = bundled_profile_named("digits-cond", guidance)
        assert (found[guidance] is None) == (named is None)
        assert found[guidance] is None or found[guidance].to_json() == named.to_json()
        if found[guidance] is None:
            continue
        assert found[guidance].guidance == guidance and {4, 5, 6, 8, 10} <= set(found[guidance].budgets)
        for entry in found[guidance].budgets.values():  # never worse than diffusers' best on its noises
            assert entry["error"] <= entry["diffusers"]["error"]
        method, grid = found[guidance].choice(schedule, 6)
        with torch.inference_mode():
            assert torch.equal(sample(guided, x, schedule, "auto", model_calls=6),
                               sample(guided, x, schedule, method, timesteps=grid))
    assert found[1.0] is not None and found[2.0] is not None and found[3.0] is None


def method_calls(method, grid):
    from pndm_fast import method_record

    return method_record(method).plan(grid).model_calls


@pytest.mark.slow
def test_the_tune_command_saves_each_budget_and_continues(tmp_path, capsys):
    from pndm_fast.cli import main

    out = tmp_path / "profile.json"
    argv = ["--runner", "tune", "--config", "digits", "--noises", "4,4", "--out", str(out), "--no_progress"]
    assert main([*argv, "--budgets", "3"]) == 0
    first = Profile.load(out)
    assert sorted(first.budgets) == [3] and first.info["config"] == "digits"
    capsys.readouterr()
    assert main([*argv, "--budgets", "3,4"]) == 0
    said = capsys.readouterr().out
    assert "holds budgets 3 for this model: continuing with the rest" in said
    again = Profile.load(out)
    assert again.budgets[3] == first.budgets[3] and sorted(again.budgets) == [3, 4]
    assert main([*argv, "--budgets", "3", "--config", "digits-cond", "--class", "1"]) == 2  # another model
    assert "tuned for another model" in capsys.readouterr().err


def in_time(work, seconds: float = 60.0):
    """work() in a thread that must finish within `seconds`: a gathering that deadlocks fails here, not hangs."""
    import threading

    box = {}

    def target():
        try:
            box["result"] = work()
        except Exception as error:  # noqa: BLE001 - raised again below, in the test's thread
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "gathered calls deadlocked"
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_gathered_calls_answer_each_party_as_its_own_call_would():
    """Parties of 3, 5 and 2 calls and one that fails before its first: 5 forwards answer all 10 calls, each with
    what the net gives its own rows (planted: outputs handed to the wrong party, or a party that ends never
    leaving, fails or deadlocks)."""
    from pndm_fast.tuning.gather import score_together

    calls = []

    def expect(x, t, y=None, scale=1.0):
        return (x * t[:, None] + y[:, None]) * scale

    def net(x, t, **kwargs):
        calls.append(len(x))
        return expect(x, t, **kwargs)

    def run(plan, shared):
        if plan is None:
            raise ValueError("fails before its first call")
        index, count = plan
        got = []
        for k in range(count):
            x, t, y = torch.full((2, 3), float(index)), torch.full((2,), float(k)), torch.tensor([index, -index])
            got.append(torch.equal(shared(x, t, y=y.float(), scale=2.0), expect(x, t, y=y.float(), scale=2.0)))
        return all(got) and len(got) == count

    plans = [(1, 3), (2, 5), (3, 2)]
    assert in_time(lambda: score_together(run, net, plans, group=3)) == [True, True, True]
    assert calls == [6, 6, 4, 2, 2]  # 3 parties, 2 once the third has left after 2 calls, then 1
    calls.clear()
    with pytest.raises(ValueError, match="fails before"):
        in_time(lambda: score_together(run, net, [(1, 2), None, (2, 3)], group=3))
    assert calls == [4, 4, 2]


def test_candidates_scored_together_score_as_one_at_a_time(ring):
    """The tuner's scorer with 4 candidates a forward: the same errors and forwards as one at a time."""
    from pndm_fast.tuning import _Scorer
    from pndm_fast.tuning.search import family_candidates

    noise = noises(6, 4)
    teacher = Teacher.solve(ring, noise, LINEAR, 50, backend="torch")
    candidates = family_candidates(LINEAR, 5, ["DDIM", "DPM-Solver++2M", "Heun", "F-PNDM"], ("logsnr", "karras"))
    alone = _Scorer(ring, LINEAR, noise, teacher.x, "torch", (0, 6, 6))
    together = _Scorer(ring, LINEAR, noise, teacher.x, "torch", (0, 6, 6), together=4)
    want = {c: alone(c) for c in candidates}
    got = in_time(lambda: together.many(candidates))
    assert got.keys() == want.keys() and together.forwards == alone.forwards
    for c in candidates:
        assert got[c] == pytest.approx(want[c], rel=1e-9, abs=1e-12), c.label


def test_a_half_precision_network_with_grads_scores_together_as_alone():
    """The shared network still names its module: its dtype, bfloat16, is what the sampler feeds it, with a
    conditioning row per image and weights that require grad (planted: a shared network without its module, and
    the gathered scores raise)."""
    from pndm_fast.tuning import _Scorer
    from pndm_fast.tuning.search import family_candidates

    class Net(torch.nn.Module):  # reads its input in its own dtype only: a float32 input is an error
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x, t, y=None):
            return self.conv(x) * y[:, None, None, None] * 0.1

    torch.manual_seed(0)
    net = Net().to(torch.bfloat16)  # weights that require grad, as a user's module may have
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model = Denoiser(net, cond={"y": torch.tensor([0.5, 1.0, 1.5], dtype=torch.bfloat16)})
    truth = torch.zeros_like(noise) + 0.5
    candidates = family_candidates(LINEAR, 4, ["DDIM", "DPM-Solver++2M", "Heun"], ("logsnr",))
    alone = _Scorer(model, LINEAR, noise, truth, "torch", (0, 3, 3))
    together = _Scorer(model, LINEAR, noise, truth, "torch", (0, 3, 3), together=3)
    want = {c: alone(c) for c in candidates}
    got = in_time(lambda: together.many(candidates))
    for c in candidates:
        assert math.isfinite(want[c]) and got[c] == pytest.approx(want[c], rel=1e-3), c.label
