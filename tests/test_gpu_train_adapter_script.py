"""scripts/gpu_train_adapter.sh, shrunk to a 1-step CPU run with a random model: trains,
benchmarks, and leaves exactly four files in OUT."""
import json
import shutil

import pytest

from conftest import run_gpu_script
from ldm.modules.adapters import load_adapter

TINY = dict(RANDOM_WEIGHTS="1", STEPS="1", BATCH="2", NUM_WORKERS="0", DEVICE="cpu", PRECISION="fp32",
            TRAIN_ARGS="--eval-size 2",
            BENCH_ARGS="--n 2 --steps 1 --seeds 0 --scale 1 --prompts 'a chair' --settings plain adapter")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path, **env):
    return run_gpu_script("gpu_train_adapter.sh",
                          {"OUT": str(tmp_path / "out"), "WORKDIR": str(tmp_path / "work"), **TINY, **env})


def test_tiny_cpu_run_writes_adapter_report_table_and_figure(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["adapter-benchmark.md", "adapter-benchmark.png",
                                                     "procedural-outline-adapter.json",
                                                     "procedural-outline-adapter.safetensors"]
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    report = json.loads((out / "procedural-outline-adapter.json").read_text())
    # the decay asked for (0.999) and the one LitEma's warm-up allowed after 1 update: (1 + 1) / (10 + 1)
    assert report["steps"] == 1 and report["ema_decay"] == 0.999 and report["ema_decay_reached"] == round(2 / 11, 6)
    assert load_adapter(out / "procedural-outline-adapter.safetensors").spec.unshuffle == 1
    table = (out / "adapter-benchmark.md").read_text()
    assert "| plain |" in table and "| adapter |" in table and "'a chair'" in table

    again = run(tmp_path)  # the outputs of the first run are never overwritten
    assert again.returncode == 2 and "exists" in again.stderr.strip().splitlines()[-1]

    # a run that --max-minutes cuts short says so on the console (the log alone had it), and
    # writes a log of its own next to the first run's (the same name overwrote it)
    short = run(tmp_path, OUT=str(tmp_path / "short"), STEPS="3", MAX_MINUTES="0.0001", BENCHMARK="0")
    assert short.returncode == 0, (short.stdout + short.stderr)[-3000:]
    assert "--max-minutes 0.0001 reached after 1 of 3 steps" in short.stdout, short.stdout[-3000:]
    assert len(list((tmp_path / "work").glob("train-procedural-outline-adapter-*.log"))) == 2


def test_missing_model_is_one_error_line(tmp_path):
    result = run(tmp_path, RANDOM_WEIGHTS="0", MODEL=str(tmp_path / "none.safetensors"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: MODEL={tmp_path / 'none.safetensors'} not found; train the embedded model first "
        f"(scripts/gpu_train_embedded.sh) and set MODEL to its .safetensors"]
    assert not (tmp_path / "out").exists()
