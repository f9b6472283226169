"""scripts/gpu_session.sh, shrunk to CPU runs: the jobs of one device call each fill their folder
(at most 8 files come back: lease 1 packs its CSVs and logs), a failed job does not cost the next,
and a spent budget skips the benchmarks."""
import shutil
import tarfile

import pytest

from conftest import TINY_CONFIG, run_gpu_script
from test_gpu_benchmarks_script import TINY as TINY_BENCHMARKS
from test_gpu_train_script import TINY as TINY_TRAINING


pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and timeout")


def run(out, logs, **env):
    tiny = {**TINY_TRAINING, **TINY_BENCHMARKS, "STAGES": "table", "NS": "1", "TABLE_SETTINGS": "anchor: all groups",
            "CONFIG": str(TINY_CONFIG), "LOGDIR": str(logs),
            "CONSISTENCY_ARGS": "--n 2 --steps 1 --seeds 0 --settings none all:all",
            "DEVICE_TESTS": "cpu and not ddim"}  # the device tests' CPU half, less its sampling run
    return run_gpu_script("gpu_session.sh", {"OUT": str(out), **tiny, **env})


def files(out):
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def lease_one(tmp_path_factory):
    """The default jobs, train, cuda, consistency and perf, as the first GPU lease runs them."""
    tmp = tmp_path_factory.mktemp("lease-one")
    return tmp / "out", run(tmp / "out", tmp / "logs")


def test_lease_one_trains_measures_consistency_on_its_weights_then_benchmarks_in_seven_files(lease_one, tmp_path):
    out, result = lease_one
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert files(out) == ["consistency/run-001/figure.png", "consistency/run-001/table.md", "logs.tar.gz",
                          "perf/benchmarks.md", "train/procedural-t2i.json", "train/procedural-t2i.safetensors",
                          "train/samples.png"]
    assert str(out / "train" / "procedural-t2i.safetensors") in (out / "consistency" / "run-001" / "table.md").read_text()
    with tarfile.open(out / "logs.tar.gz") as logs:
        assert sorted(logs.getnames()) == ["./consistency/run-001/results.csv", "./cuda/pytest.log",
                                           "./perf/benchmarks.log", "./perf/results.csv", "./train/metrics.csv",
                                           "./train/train-tail.log"]
        assert b"stage table done" in logs.extractfile("./perf/benchmarks.log").read()
        assert b" passed" in logs.extractfile("./cuda/pytest.log").read()
    assert "[gpu_session" in result.stdout and " passed" in result.stdout.split("cuda: ")[-1].splitlines()[0]

    again = run(out, tmp_path / "logs")  # never overwrites what a call brought back
    assert again.returncode == 2 and "train exists; use an empty OUT" in again.stderr.strip().splitlines()[-1]


def test_lease_three_trains_the_adapter_on_the_committed_weights_and_benchmarks(lease_one, tmp_path):
    out = tmp_path / "out"
    result = run(out, tmp_path / "logs", JOBS="adapter perf", MODEL=str(lease_one[0] / "train" /
                 "procedural-t2i.safetensors"), PRECISION="fp32", STEPS="1", BENCHMARK="1", WORKDIR=str(tmp_path / "work"),
                 TRAIN_ARGS="--eval-size 2",
                 BENCH_ARGS="--n 2 --steps 1 --seeds 0 --scale 1 --prompts 'a chair' --settings plain adapter")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert files(out) == ["adapter/adapter-benchmark.md", "adapter/adapter-benchmark.png",
                          "adapter/procedural-outline-adapter.json", "adapter/procedural-outline-adapter.safetensors",
                          "perf/benchmarks.log", "perf/benchmarks.md", "perf/results.csv"]


def test_a_failed_training_still_runs_the_benchmarks(tmp_path):
    result = run(tmp_path / "out", tmp_path / "logs", ACCELERATOR="no-such-accelerator")
    assert result.returncode == 1
    assert (tmp_path / "out" / "perf" / "benchmarks.md").is_file()
    assert "failed, skipped or timed out: train consistency" in result.stdout  # no weights to measure


def test_the_cuda_job_fails_without_a_cuda_device_instead_of_skipping_its_tests(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = run(tmp_path / "out", tmp_path / "logs", JOBS="cuda", DEVICE_TESTS="cuda")
    assert result.returncode == 1
    assert (tmp_path / "out" / "cuda" / "pytest.log").read_text().strip() == "error: torch sees no CUDA device"
    assert "failed, skipped or timed out: cuda" in result.stdout


def test_benchmarks_are_skipped_when_the_time_is_spent(tmp_path):
    result = run(tmp_path / "out", tmp_path / "logs", ACCELERATOR="no-such-accelerator", TOTAL_SECONDS="0")
    assert result.returncode == 1
    assert all(f"{job} skipped" in result.stdout for job in ("consistency", "cuda", "perf"))
    assert not any((tmp_path / "out" / job).exists() for job in ("consistency", "cuda", "perf"))
    assert "failed, skipped or timed out: train cuda consistency perf" in result.stdout


def test_after_a_training_that_used_its_time_the_cuda_checks_still_run(tmp_path):
    """SECONDS=380: bash starts its clock there, as after a training that reached MAX_TIME (330 s)
    and then exported and sampled: cuda, which cannot shrink, runs before consistency, which can."""
    result = run(tmp_path / "out", tmp_path / "logs", ACCELERATOR="no-such-accelerator", SECONDS="380")
    log = result.stdout
    assert "cuda skipped" not in log and " passed" in log.split("cuda: ")[-1].splitlines()[0]
    assert log.index("] cuda") < log.index("] consistency")


def test_an_unknown_job_is_one_error_line(tmp_path):
    result = run(tmp_path / "out", tmp_path / "logs", JOBS="train warp")
    assert result.returncode == 2 and "unknown job 'warp'" in result.stderr.strip().splitlines()[-1]
