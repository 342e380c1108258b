"""pndm_fast.pretrained: the bundled model in one call, offline, equal to its packaged weights file."""

from importlib import resources

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pndm_fast
from pndm_fast import UserError, pretrained, pretrained_names


def test_digits_is_the_packaged_weights_in_eval_mode_with_the_configs_schedule():
    model, schedule = pretrained("digits")
    # safetensors' own reader, not the package's loader, is the reference for what the file holds
    stored = load_file(str(resources.files("pndm_fast") / "weights" / "digits.safetensors"))
    state = model.state_dict()
    assert set(state) == set(stored)
    for key, value in stored.items():
        assert torch.equal(state[key], value.float()), key
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # digits.yml: linear betas from 1e-4 to 0.02 over 1000 steps
    np.testing.assert_allclose(schedule.betas.double().numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-6)
    assert "digits" in pretrained_names()


def test_it_runs_in_another_dtype_and_prints_in_one_line():
    bundle = pretrained("digits", dtype=torch.bfloat16)
    assert next(bundle.model.parameters()).dtype == torch.bfloat16
    text = repr(bundle)
    assert "\n" not in text and "0.70 M parameters" in text and "1x16x16" in text, text


@pytest.mark.parametrize("name", ["ddim-cifar10", "nope", ""])
def test_a_model_that_is_not_bundled_is_refused_in_one_line(name):
    with pytest.raises(UserError) as err:
        pretrained(name)
    message = str(err.value)
    assert "\n" not in message and "digits" in message and "load_checkpoint" in message, message


def test_the_api_exports_it():
    assert pndm_fast.pretrained is pretrained and "pretrained" in pndm_fast.__all__


def test_the_readme_grid_is_digits():
    """The README's first command's 64 digits (F-PNDM, 20 steps, seed 0; image i's noise is noise_for's) through
    the shipped classifier: at most MAX_UNSURE are below 0.9 probability for their top class. Measured by
    `python benchmarks/digits_quality.py`: 4% of real digits are; the bundled model before its longer training
    left 25 of these 64."""
    from digits_classifier import load_classifier
    from pndm_fast.images import to_uint8
    from pndm_fast.runners.sample import noise_for

    model, schedule = pretrained("digits")
    with torch.inference_mode():
        x = pndm_fast.sample(model, noise_for(range(64), (1, 16, 16), 0), schedule, "F-PNDM", 20)
        unit = torch.from_numpy(to_uint8(x)[..., 0]).float().unsqueeze(1) / 255.0  # through uint8, as the PNGs
        confidence = torch.softmax(load_classifier()(unit), 1).max(1).values
    unsure = int((confidence < 0.9).sum())
    assert unsure <= MAX_UNSURE, f"{unsure} of 64 digits are not confidently any digit"


MAX_UNSURE = 10  # measured: 7 (docs/accuracy.md); a borderline digit may fall either side on another build
