"""Write gpu_checks.sh's results into RESULTS.md as the section `## GPU checks`, replacing an earlier one.

    python benchmarks/record_gpu.py OUT [--results benchmarks/RESULTS.md]

Reads OUT/<stage>/<bench>.json (bench_launch, tune_lincomb, bench_e2e) and OUT/full_suite.log; each table comes
with the command that made it, the card and the versions its rows recorded. run_all.py keeps `## GPU` sections.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_e2e  # noqa: E402
import bench_launch  # noqa: E402
import common  # noqa: E402
import tune_lincomb  # noqa: E402

HEADING = "## GPU checks"
TABLES = [("Eager launch: host time per call", "launch", bench_launch),
          ("Kernel launch configurations against the copy roofline", "tune", tune_lincomb),
          ("End to end with the graph bound, fp32 and bf16, channels_last", "e2e", bench_e2e)]


def section(out: Path) -> str:
    parts = [f"{HEADING}\n\n`bash benchmarks/gpu_checks.sh` (logs and JSON rows in its OUT folder).\n"]
    for title, name, bench in TABLES:
        path = next(iter(sorted(out.glob(f"*/{bench.NAME}.json"))), None)
        rows = json.loads(path.read_text()) if path else []
        if not rows:
            parts.append(f"### {title}\n\nNot recorded (the stage did not finish; see its log).\n")
            continue
        r = rows[0]
        parts.append(f"### {title}\n\n`{r['command']}`: {r['device']}, torch {r['torch']}, triton {r['triton']}, "
                     f"{r['timestamp']}\n\n{common.markdown_table(rows, bench.COLUMNS)}\n")
    log = out / "full_suite.log"
    if log.exists():
        text = log.read_text(errors="replace")
        failed = sorted(set(re.findall(r"(?:FAILED|ERROR) (tests/\S+)", text)))
        summary = next((line for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed)", line)), "")
        names = "\n".join(f"- {name}" for name in failed) or "- none"
        parts.append(f"### The whole suite on the GPU\n\n`{summary.strip('= ')}`\n\nFailed or errored:\n\n{names}\n")
    return "\n".join(parts)


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
