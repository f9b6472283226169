"""scripts/gpu_benchmarks.sh, shrunk to a CPU run of the tiny config: its stages run, and $OUT gets
the markdown tables, the CSV and the log (at most 4 files)."""
import csv
import shutil

import pytest
import torch

from conftest import TINY_CONFIG, run_gpu_script

TINY = dict(DEVICE="cpu", CONFIG=str(TINY_CONFIG), SIZE="64", NS="1 2", N_VARIANT="2", DTYPE="fp32",
            REPEATS="1", E2E_REPEATS="1", E2E_STEPS="2", STAGES="table e2e chlast graphs",
            TABLE_SETTINGS="vanilla einsum (upstream);anchor: all groups",
            OMP_NUM_THREADS="1")  # see tests/test_benchmark_attention.py: one thread on 2 shared cores

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def run(out, **env):
    return run_gpu_script("gpu_benchmarks.sh", {"OUT": str(out), **TINY, **env}, timeout=600)


def test_tiny_cpu_run_writes_tables_csv_and_log(tmp_path):
    out = tmp_path / "out"
    result = run(out)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["benchmarks.log", "benchmarks.md", "results.csv"]
    tables = (out / "benchmarks.md").read_text()
    for title in ("UNet call, fp32, every setting", "End to end, fp32, 2 DDIM steps", "UNet call, fp32 + channels_last"):
        assert f"## {title}" in tables
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["kind"] for r in rows} == {"unet", "end-to-end"}
    table = [r for r in rows if r["variant"] == "fp32" and r["kind"] == "unet"]
    assert sorted({r["setting"] for r in table}) == ["anchor: all groups", "vanilla einsum (upstream)", "vanilla sdpa"]
    assert len(table) == 2 * 3  # N = 1, 2
    assert all(r["status"] == "ok" for r in rows)
    assert "stage graphs skipped" in (out / "benchmarks.log").read_text()

    again = run(out, STAGES="table")  # the outputs of the first run are never overwritten
    assert again.returncode == 2 and "exists" in again.stderr.strip().splitlines()[-1]


def test_unknown_stage_is_one_error_line(tmp_path):
    result = run(tmp_path / "out", STAGES="table warp")
    assert result.returncode == 2
    assert "unknown stage 'warp'" in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_the_default_cuda_device_without_cuda_is_one_error_line_and_writes_nothing(tmp_path):
    """Every stage failed, the reason only in benchmarks.log; the console said 'stage X failed'."""
    result = run(tmp_path / "out", DEVICE="cuda")
    assert result.returncode == 2
    assert "CUDA is not available here" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_a_deadline_cuts_every_stages_limit_and_skips_what_no_longer_fits(tmp_path):
    """gpu_session.sh passes what is left of the lease as DEADLINE: the variant stages (no
    STAGE_LIMITS entry of their own, lease 3) had 600 s each, past the device's command limit."""
    run(tmp_path / "out", STAGES="chlast bf16", STAGE_LIMITS="chlast=300", DEADLINE="40", TABLE_SETTINGS="vanilla sdpa")
    log = (tmp_path / "out" / "benchmarks.log").read_text()
    limits = [int(line.split("(limit ")[1].split(" s)")[0]) for line in log.splitlines() if "(limit " in line]
    assert limits and all(limit <= 40 for limit in limits), log
    skipped = run(tmp_path / "late", STAGES="chlast bf16", DEADLINE="10")
    assert skipped.returncode == 1
    assert "stage chlast skipped: " in skipped.stdout and "stage bf16 skipped: " in skipped.stdout
    assert "##" not in (tmp_path / "late" / "benchmarks.md").read_text().split("\n", 1)[1]  # no table


def test_a_short_stage_limit_of_its_own_is_no_reason_to_skip_it(tmp_path):
    """Only what is left before the DEADLINE skips a stage: a table given 17 s of a call with 86 s
    left runs (gpu_session.sh gives the table what the end-to-end stage leaves)."""
    result = run(tmp_path / "out", STAGES="table", STAGE_LIMITS="table=17", DEADLINE="86", NS="1",
                 TABLE_SETTINGS="vanilla sdpa")
    log = (tmp_path / "out" / "benchmarks.log").read_text()
    assert "stage table skipped" not in log and "stage table: " in log and "(limit 17 s)" in log, result.stdout
