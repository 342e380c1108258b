"""SIGKILL at random moments loses nothing: the fault-injection script on a few trials, and a kill that lands
while training writes a checkpoint."""

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pndm_fast.runners.train import EMA_FILE, STATE_FILE

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "fault_injection.py")


def load_script():
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_reports_nothing_lost(tmp_path):
    cmd = [sys.executable, SCRIPT, "--trials", "1", "--max_kills", "1", "--seed", "3", "--work", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("sampling: 1 trials") and "0 images lost, 0 corrupt, 0 differing" in line
               and "0 temporary files left" in line for line in lines), done.stdout
    assert any(line.startswith("training: 1 trials") and "0 broken checkpoints" in line
               and "bitwise equal to the uninterrupted run in 1 of 1" in line for line in lines), done.stdout
    kinds = ("concurrent sampling", "concurrent training", "full disk (sampling)", "full disk (training)",
             "planted links", "retrained checkpoint")
    assert any(line.startswith("faults: ") and all(f"{kind} 1 of 1 survived" in line for kind in kinds)
               for line in lines), done.stdout
    assert lines[-1] == ("total: 9 fault attempts, 9 survived; images or checkpoints: 0 lost, 0 mixed, "
                         "0 corrupt"), done.stdout


def test_script_notices_a_refusal_that_is_not_one_line_and_mixed_images(tmp_path):
    """The fault checks can fail: a traceback is not a refusal, and an image of another run counts as mixed."""
    script = load_script()
    assert script.one_line_refusal(2, "pndm-fast: error: /x is in use by process 7\n", "in use")
    assert not script.one_line_refusal(1, "Traceback (most recent call last):\n  ...\nOSError: [Errno 28]\n")
    assert not script.one_line_refusal(2, "pndm-fast: error: no space\nTraceback ...\n")
    from PIL import Image

    Image.new("L", (16, 16), 0).save(tmp_path / "000000.png")
    Image.new("L", (16, 16), 7).save(tmp_path / "000001.png")
    reference = {name: np.zeros((16, 16, 1), np.uint8) for name in ("000000.png", "000001.png")}
    counts = script.compare_images(str(tmp_path), (1, 16, 16), reference, total=3)
    assert counts == {"lost": 1, "corrupt": 0, "temps": 0, "mixed": 1}


def test_script_notices_a_damaged_image(tmp_path):
    """The checks can fail: a file cut short under its final name is counted as corrupt."""
    script = load_script()
    shape = (1, 16, 16)
    from PIL import Image

    Image.new("L", (16, 16)).save(tmp_path / "000000.png")
    whole = (tmp_path / "000000.png").read_bytes()
    (tmp_path / "000001.png").write_bytes(whole[:-10])
    images, corrupt = script.final_images(str(tmp_path), shape)
    assert list(images) == ["000000.png"] and corrupt == 1


def test_script_notices_a_broken_or_older_checkpoint(tmp_path):
    script = load_script()
    torch.save({"step": 4}, tmp_path / STATE_FILE)
    assert script.check_after_kill(str(tmp_path), 2) == (True, 4)
    assert script.check_after_kill(str(tmp_path), 6) == (False, 6)  # went back: a newer save was lost
    (tmp_path / STATE_FILE).write_bytes(b"PK\x03\x04 cut short")
    assert script.check_after_kill(str(tmp_path), 4)[0] is False


def test_kill_during_a_checkpoint_save_keeps_the_previous_one(tmp_path):
    """Save every step; once train_state.pt exists, SIGKILL the moment the next save's temporary file appears;
    then --restart: the previous checkpoint loads, and the run ends bitwise equal to one that never stopped."""
    script = load_script()
    config = script.tiny_train_config()
    config["Train"]["save_every"] = 1
    config_path = tmp_path / "tiny.yml"
    config_path.write_text(yaml.safe_dump(config))
    folder, reference, steps = str(tmp_path / "run"), str(tmp_path / "reference"), 12
    script.run_to_end(script.train_command(str(config_path), reference, restart=False, max_steps=steps))

    state_path = os.path.join(folder, STATE_FILE)
    for _ in range(5):  # the watcher may see the temporary file just as it is renamed: then try again
        shutil.rmtree(folder, ignore_errors=True)
        cmd = script.train_command(str(config_path), folder, restart=False, max_steps=steps)
        assert script.launch_and_kill(cmd, 0.0, watch=(folder, (STATE_FILE,)), armed_by=state_path), \
            "the run finished before a save could be interrupted"
        if script.temp_files(folder, (STATE_FILE,)):
            break
    else:
        pytest.fail("no kill landed inside a save in 5 tries")
    state = torch.load(state_path, weights_only=True)  # the checkpoint before the interrupted save, whole
    assert 1 <= state["step"] < steps
    assert torch.load(os.path.join(folder, EMA_FILE), weights_only=True).keys() == state["ema"].keys()
    script.run_to_end(script.relaunch_command(str(config_path), folder, max_steps=steps))
    assert script.same_training(folder, reference)


def test_relaunch_restarts_exactly_when_a_training_state_exists(tmp_path):
    """A kill before the first save leaves no train_state.pt: start afresh. Once one exists, --restart (train.py
    writes train_state.pt before ema.ckpt, so no kill leaves an ema.ckpt without its state)."""
    script = load_script()
    assert "--restart" not in script.relaunch_command("tiny.yml", str(tmp_path))
    torch.save({"step": 2}, tmp_path / STATE_FILE)
    assert "--restart" in script.relaunch_command("tiny.yml", str(tmp_path))
