"""The README's two commands are what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readmes_install_and_test_commands_verbatim():
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_the_readmes_python_examples_run_as_printed(capsys):
    """Every Python example in the README runs offline, as printed (the diffusers one where diffusers is
    installed)."""
    import importlib.util

    ran = 0
    for block in python_blocks():
        if "from diffusers" in block and importlib.util.find_spec("diffusers") is None:
            continue
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
        ran += 1
    assert ran >= 2
