"""The README's two commands are what CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readmes_install_and_test_commands_verbatim():
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    install, test = blocks[0].strip(), blocks[1].strip()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and test in ci
