"""The README's two commands are what CI runs, and its Python examples run as printed and do what it says they do."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import relative_l2

import pndm_fast

REPO = Path(__file__).resolve().parent.parent
# The one Python block not run here: it loads the paper's published checkpoint, which the reader downloads.
DOWNLOADS = "ddim_cifar10.ckpt"
# The text that picks out each block a test below runs.
FIRST, GRIDS, GUIDED, DIFFUSERS, FLOW = ('build_plan(schedule, "F-PNDM", 20)', 'make_grid(schedule, "karras", 8)',
                                         'pretrained("digits-cond")', "from diffusers", 'pretrained("digits-flow")')


def test_ci_runs_the_readmes_install_and_test_commands_verbatim():
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def block_with(text: str) -> str:
    found = [block for block in python_blocks() if text in block]
    assert len(found) == 1, f"{len(found)} Python blocks of the README contain {text!r}"
    return found[0]


def test_every_python_example_is_run_by_a_test_here():
    """Each block is one of those the tests below run (the first one first), or the one that needs a download."""
    blocks = python_blocks()
    assert FIRST in blocks[0]
    for block in blocks:
        assert sum(text in block for text in (FIRST, GRIDS, GUIDED, DIFFUSERS, FLOW, DOWNLOADS)) == 1, block


def run_block(block: str, monkeypatch) -> tuple[dict, list]:
    """Execute `block` as printed; returns its namespace and every pndm_fast.sample call it made, as
    (args, kwargs, result) with the noise copied before the call."""
    calls, real = [], pndm_fast.sample

    def recording(model, noise, *args, **kwargs):
        given = noise.clone()
        result = real(model, noise, *args, **kwargs)
        calls.append(((model, given, *args), kwargs, result))
        return result

    monkeypatch.setattr(pndm_fast, "sample", recording)
    namespace: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    monkeypatch.undo()
    assert calls, "the example samples nothing"
    return namespace, calls


def check_against_the_reference(calls) -> None:
    """Every run the example made gives finite images of its noise's shape, those of the methods' own formulas
    (backend "reference") on the same noise up to float32 rounding."""
    for args, kwargs, result in calls:
        assert result.shape == args[1].shape and torch.isfinite(result).all()
        with torch.no_grad():
            reference = pndm_fast.sample(*args, **{**kwargs, "backend": "reference"})
        assert relative_l2(result, reference) < 1e-4, (args[2:], kwargs)


def digits(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, 16, 16) samples -> (B, 10) class probabilities of the shipped digits classifier."""
    from digits_classifier import load_classifier

    with torch.no_grad():
        return load_classifier()(((x + 1) / 2).clamp(0, 1)).softmax(1)


def test_the_first_python_example_runs_as_printed_offline(capsys, monkeypatch):
    """The README's first block, executed as it stands, with no download: 16 digits (the shipped classifier is
    sure of most of them, as docs/accuracy.md measures), pixel values about -1 to 1, the printed shape and range
    those of x, and the printed plan the one sample() ran (running it gives x again). Fails if the bundled model
    is not the trained one (planted: pretrained() returning the network without loading its weights) or the
    printed plan is not what ran (planted: resolve_run building the grid of 50 steps whatever sample_step says)."""
    namespace, calls = run_block(block_with(FIRST), monkeypatch)
    printed = capsys.readouterr().out.rstrip("\n").split("\n")
    x, model, schedule, noise = (namespace[name] for name in ("x", "model", "schedule", "noise"))
    assert x.shape == (16, 1, 16, 16)
    assert printed[0] == f"{x.shape} {x.min().item()} {x.max().item()}"
    plan = pndm_fast.build_plan(schedule, "F-PNDM", 20)
    assert "\n".join(printed[1:]) == str(plan) and len(plan.steps) == 20
    with torch.no_grad():
        assert torch.equal(pndm_fast.sample(model, noise, schedule, plan, backend="fused"), x)
    assert -1.25 < x.min() < -0.9 and 0.9 < x.max() < 1.25
    sure = digits(x).max(1).values >= 0.9
    assert int(sure.sum()) >= 12, f"the classifier is sure of {int(sure.sum())} of 16 digits"
    assert len(calls) == 1


def test_the_flow_example_makes_digits_with_the_flow_model(monkeypatch):
    """The block with the bundled rectified-flow model: 16 digits in 10 model calls, most of which the shipped
    classifier is sure of, equal to the methods' own formulas. Fails if the model is read as an eps model
    (planted: build_model declaring no reading) or its time is not 1000 s."""
    torch.manual_seed(0)  # the block draws its noise from the global generator
    namespace, calls = run_block(block_with(FLOW), monkeypatch)
    x = namespace["x"]
    assert x.shape == (16, 1, 16, 16) and -1.25 < x.min() and x.max() < 1.25
    sure = digits(x).max(1).values >= 0.9
    assert int(sure.sum()) >= 10, f"the classifier is sure of {int(sure.sum())} of 16 digits"
    check_against_the_reference(calls)


def test_the_grid_and_plan_example_prints_the_grid_and_the_plan(capsys, monkeypatch):
    """The block with make_grid: it samples digits with DPM-Solver++2M on the logsnr grid, and prints the karras
    grid of 8 steps and UniPC-bh2's plan on it, 8 steps with one model call each. Fails if the bundled model is
    not the trained one (planted: pretrained() returning the network without loading its weights)."""
    torch.manual_seed(0)  # the block draws its noise from the global generator
    namespace, calls = run_block(block_with(GRIDS), monkeypatch)
    schedule = namespace["schedule"]
    grid = pndm_fast.make_grid(schedule, "karras", 8)
    plan = pndm_fast.build_plan(schedule, "UniPC-bh2", 8, timesteps="karras")
    assert capsys.readouterr().out == f"{grid}\n{plan}\n"
    assert len(grid.times) == 9 and len(plan.steps) == 8 and plan.model_calls == 8
    assert [call.t for call, *_ in plan.steps] == list(grid.times[:-1])
    x = namespace["x"]
    assert x.shape == (4, 1, 16, 16) and -1.25 < x.min() and x.max() < 1.25
    assert int((digits(x).max(1).values >= 0.9).sum()) >= 2
    check_against_the_reference(calls)


def test_the_guided_example_draws_one_digit_of_each_class(monkeypatch):
    """The class-conditional block: its 10 images are the digits 0 to 9 in order, as the shipped classifier reads
    them. Fails if the labels do not reach the network (planted: Denoiser keeping the unconditional inputs as
    the conditional ones)."""
    torch.manual_seed(0)
    namespace, calls = run_block(block_with(GUIDED), monkeypatch)
    predicted = digits(namespace["x"]).argmax(1)
    assert int((predicted == torch.arange(10)).sum()) >= 8, predicted.tolist()
    check_against_the_reference(calls)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers (the diffusers extra)")
def test_the_diffusers_example_runs_a_diffusers_unet(monkeypatch):
    """The diffusers block: a UNet2DModel sampled through Denoiser.from_diffusers gives the images of the
    methods' own formulas on the same noise."""
    torch.manual_seed(0)
    namespace, calls = run_block(block_with(DIFFUSERS), monkeypatch)
    assert namespace["x"].shape == (4, 3, 16, 16)
    check_against_the_reference(calls)
