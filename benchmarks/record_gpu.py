"""Write gpu_checks.sh's results into RESULTS.md as the section `## GPU checks`, replacing an earlier one.

    python benchmarks/record_gpu.py OUT [--results benchmarks/RESULTS.md]

Reads OUT/<stage>/<bench>.json (bench_kernels, tune_lincomb, bench_stack, bench_blend) and OUT/gpu_tests.log and
OUT/full_suite.log; each table comes with the command that made it, the card and the versions its rows recorded.
run_all.py keeps `## GPU` sections.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_blend  # noqa: E402
import bench_kernels  # noqa: E402
import bench_stack  # noqa: E402
import common  # noqa: E402
import tune_lincomb  # noqa: E402

HEADING = "## GPU checks"
TABLES = [("The fused op against the copy roofline and torch.compile, eager and graphed", "kernels", bench_kernels),
          ("Kernel launch configurations against the copy roofline", "tune", tune_lincomb),
          ("Per sampling step: combination kernels, bf16, guidance, the graph bound and diffusers", "stack",
           bench_stack),
          ("Inpainting's blend inside the fused pass, against its own passes", "blend", bench_blend)]
LOGS = [("The GPU tests", "gpu_tests.log"), ("The whole suite on the GPU (the GPU tests left out)", "full_suite.log")]


def section(out: Path) -> str:
    parts = [f"{HEADING}\n\n`bash benchmarks/gpu_checks.sh` (logs and JSON rows in its OUT folder).\n"]
    machine = out / "machine.txt"
    if machine.exists():  # the card, its driver and the versions, as the script printed them
        parts.append("```\n" + machine.read_text(errors="replace").strip() + "\n```\n")
    for title, name, bench in TABLES:
        path = next(iter(sorted(out.glob(f"*/{bench.NAME}.json"))), None)
        rows = json.loads(path.read_text()) if path else []
        if not rows:
            parts.append(f"### {title}\n\nNot recorded (the stage did not finish; see its log).\n")
            continue
        r = rows[0]
        parts.append(f"### {title}\n\n`{r['command']}`: {r['device']}, torch {r['torch']}, triton {r['triton']}, "
                     f"{r['timestamp']}\n\n{common.markdown_table(rows, bench.COLUMNS)}\n")
    for title, name in LOGS:
        log = out / name
        if log.exists():
            parts.append(suite_summary(title, log.read_text(errors="replace")))
    return "\n".join(parts)


def suite_summary(title: str, text: str) -> str:
    """pytest's last summary line and every test that failed or errored, from a -v log (cut short or not)."""
    # a parametrized id may hold spaces: the name runs to pytest's " - reason" or the end of the line
    failed = sorted(set(re.findall(r"(?:FAILED|ERROR) (tests/[^\n]*?)(?: - |\s*$)", text, re.MULTILINE)))
    summary = next((line for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
    ran = len(re.findall(r"\b(?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text))
    summary = summary.strip("= ") or f"cut short: {ran} results logged, no summary"
    names = "\n".join(f"- {name}" for name in failed) or "- none"
    return f"### {title}\n\n`{summary}`\n\nFailed or errored:\n\n{names}\n"


def replace_section(text: str, new: str) -> str:
    """text with its `## GPU checks` section (up to the next `## ` heading) replaced by new, or new appended."""
    parts = re.split(r"(?m)^(?=## )", text)
    kept = [p for p in parts if not p.startswith(HEADING)]
    return "".join(kept).rstrip("\n") + "\n\n" + new.rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    text = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    args.results.write_text(replace_section(text, section(args.out)))
    print(f"wrote {HEADING!r} into {args.results}")


if __name__ == "__main__":
    main()
