"""Every benchmark runs in its tiny --smoke mode, so none of them rots: JSON rows with the required fields, the
tables printed, RESULTS.md regenerated with its GPU section kept. No timing is asserted."""

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import run_all  # noqa: E402

# Per benchmark, the measurement fields each row must carry besides common.REQUIRED_FIELDS.
FIELDS = {
    "kernels": ("shape", "provider", "us", "us_spread", "gbps", "copy_gbps", "floor_us", "of_roofline"),
    "launch": ("shape", "provider", "host_us", "host_us_spread", "x_add"),
    "compile": ("model", "batch", "variant", "compile_s", "eager_ms", "variant_ms", "speedup", "max_abs_diff"),
    "sampler": ("batch", "provider", "model_calls", "ms_per_call", "ms_per_call_spread", "floor_ms", "x_floor"),
    "e2e": ("model", "batch", "variant", "model_calls", "latency_ms", "latency_ms_spread", "images_per_s",
            "first_s", "bound_ms", "x_bound"),
}
GPU = "## GPU (H100)\n\n| kept | table |\n\n## GPU bf16\nalso kept\n"
PROVIDERS = {"kernels": {"torch-reference", "torch-compile"}, "launch": {"torch.add", "registered op", "bound"},
             "compile": {"compiled"},
             "sampler": {"paper's loop", "pndm_fast reference", "pndm_fast torch", "pndm_fast fused"},
             "e2e": {"reference", "fused"}}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """run_all.py --smoke into a tmp folder that already holds a RESULTS.md with GPU sections; (folder, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    (out / "RESULTS.md").write_text(f"# old\n\n## Kernels\nstale\n\n{GPU}")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_all.main(["--smoke", "--out", str(out), "--device", "cpu"])
    return out, printed.getvalue()


@pytest.mark.parametrize("name", list(FIELDS))
def test_rows_have_the_required_fields(smoke, name):
    rows = json.loads((smoke[0] / f"{name}.json").read_text())
    assert rows
    for row in rows:
        missing = [k for k in common.REQUIRED_FIELDS + FIELDS[name] if row.get(k) is None]
        assert not missing, f"{name} row {row} lacks {missing}"
        assert row["command"].startswith(f"python benchmarks/bench_{name}.py --smoke")
    names = {row.get("provider") or row.get("variant") for row in rows}
    assert PROVIDERS[name] <= names


def test_results_md_has_every_table_and_keeps_gpu_sections(smoke):
    text = (smoke[0] / "RESULTS.md").read_text()
    for title, bench in run_all.BENCHES:
        assert f"## {title}" in text and f"python benchmarks/bench_{bench.NAME}.py --smoke" in text
    assert sum(line.startswith("|---|") for line in text.splitlines()) == len(run_all.BENCHES)  # one table each
    assert "stale" not in text
    assert text.endswith(GPU)


@pytest.mark.parametrize("header", ["| shape | MB | provider |", "| batch | provider | calls |",
                                    "| model | batch | variant |"])
def test_tables_print(smoke, header):
    assert header in smoke[1]


def test_gpu_sections_are_cut_at_the_next_heading():
    text = "# R\n## Kernels\nx\n## GPU\nkeep\n## E2E\ny\n"
    assert run_all.gpu_sections(text) == "## GPU\nkeep\n"


def test_e2e_refuses_a_model_its_mode_does_not_run(tmp_path):
    import bench_e2e

    with pytest.raises(SystemExit, match="--models nope: this mode runs digits"):
        bench_e2e.main(["--smoke", "--device", "cpu", "--models", "nope", "--out", str(tmp_path)])


def test_host_profile_names_the_variant_and_its_ops(capsys):
    import profile_host

    profile_host.main(["--device", "cpu", "--steps", "1", "--variants", "fused", "--rows", "3"])
    printed = capsys.readouterr().out
    assert "## digits batch 1, F-PNDM 1 steps, fused:" in printed and "Self CPU" in printed


def test_blend_bench_writes_its_rows_and_its_section(tmp_path):
    import bench_blend

    page = tmp_path / "page.md"
    page.write_text("# page\n\nkept\n")
    with contextlib.redirect_stdout(io.StringIO()):
        bench_blend.main(["--smoke", "--out", str(tmp_path), "--device", "cpu", "--doc", str(page)])
    rows = json.loads((tmp_path / "blend.json").read_text())
    assert {r["provider"] for r in rows} == {"separate passes", "fused"} and all(r["us"] > 0 for r in rows)
    text = page.read_text()
    assert text.startswith("# page\n\nkept\n") and "python benchmarks/bench_blend.py --smoke --device cpu" in text


def test_gpu_checks_script_parses_and_names_tests_that_exist():
    """The GPU pass runs only where a GPU is lent: a renamed test or a syntax error must show up here first."""
    import re
    import subprocess

    script = BENCHMARKS / "gpu_checks.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    named = re.findall(r"(tests/\w+\.py)(?:::(\w+))?", script.read_text())
    assert named
    for path, test in named:
        source = (BENCHMARKS.parent / path).read_text()
        assert not test or f"def {test}(" in source, f"{path}::{test} is gone"
    for bench in re.findall(r"benchmarks/(\w+\.py)", script.read_text()):
        assert (BENCHMARKS / bench).exists(), bench


def test_record_gpu_replaces_its_section_and_names_failures(tmp_path):
    """gpu_checks.sh's last step: tables from the stages' JSON rows, the tests' failures, one section replaced."""
    import bench_kernels
    import record_gpu

    out = tmp_path / "gpu"
    bench_kernels.main(["--smoke", "--device", "cpu", "--out", str(out / "kernels")])
    (out / "full_suite.log").write_text("FAILED tests/test_a.py::test_x - boom\nERROR tests/test_b.py::test_y\n"
                                        "=== 2 failed, 10 passed in 3.0s ===\n")
    (out / "gpu_tests.log").write_text("[gw0] [ 50%] PASSED tests/test_c.py::test_z\n"
                                       "[gw1] [100%] FAILED tests/test_c.py::test_w[an id with spaces] \n")
    (out / "machine.txt").write_text("name, driver_version\nNVIDIA H100, 580.1\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# R\n\n## Kernels\nkeep\n\n## GPU checks\nstale table\n\n## GPU\nkept\n")
    for _ in range(2):  # a second run replaces the section it wrote
        record_gpu.main([str(out), "--results", str(results)])
    text = results.read_text()
    assert text.count("## GPU checks") == 1 and "stale table" not in text and "keep" in text and "kept" in text
    assert "| torch-reference |" in text and "python benchmarks/bench_kernels.py --smoke" in text
    assert "- tests/test_a.py::test_x" in text and "- tests/test_b.py::test_y" in text
    assert "2 failed, 10 passed" in text and text.count("Not recorded") == 3  # tune, stack and blend did not run
    assert "NVIDIA H100, 580.1" in text
    # a log cut short has no summary line: its failures are still named, and how many results it logged
    assert "- tests/test_c.py::test_w[an id with spaces]\n" in text and "cut short: 2 results logged" in text


def test_tune_lincomb_says_it_needs_cuda(tmp_path):
    import tune_lincomb

    text, rows = tune_lincomb.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    assert rows == [] and "tuned on a CUDA device" in text
