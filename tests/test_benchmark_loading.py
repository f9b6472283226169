"""scripts/benchmark_loading.py at the tiny config: its table, its clean-up and its error lines."""
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TINY_CONFIG, load_script

bench = load_script("benchmark_loading")


def test_table_times_both_ways_of_loading_each_format_and_leaves_no_checkpoint(tmp_path, capsys):
    handler = signal.getsignal(signal.SIGTERM)
    bench.main(["--config", str(TINY_CONFIG), "--repeats", "1", "--workdir", str(tmp_path)])
    assert signal.getsignal(signal.SIGTERM) is handler  # its SIGTERM handler was left in the caller's process
    lines = capsys.readouterr().out.splitlines()
    assert "v1-tiny.yaml" in lines[0] and "medians of 1 load(s)" in lines[0]
    row = re.compile(r"\| (fp16 \.safetensors|fp32 \.ckpt|fp16 \.ckpt) \| (built then loaded|into placeholders) \| "
                     r"([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|")
    rows = {(m[1], m[2]): tuple(map(float, m.groups()[2:])) for m in map(row.match, lines) if m}
    assert set(rows) == {(f, w) for f in bench.FORMATS for w in bench.WAYS}
    for f in bench.FORMATS:
        (built, ratio, *built_memory), (placed, one, *placed_memory) = rows[f, bench.WAYS[0]], rows[f, bench.WAYS[1]]
        assert built > 0 and placed > 0 and one == 1.0
        for peak, held in (built_memory, placed_memory):
            assert 0 < held <= peak
        assert ratio == pytest.approx(built / placed, abs=0.01 + 0.01 / placed)  # of the printed medians
    assert not any(tmp_path.iterdir())  # the checkpoints it wrote are gone


def test_a_run_ended_by_kill_deletes_the_checkpoints_it_wrote(tmp_path):
    """SD v1's three checkpoints are 8.5 GB: a run stopped with `kill` must not leave them behind."""
    command = [sys.executable, str(REPO / "scripts" / "benchmark_loading.py"), "--config", str(TINY_CONFIG),
               "--repeats", "50", "--workdir", str(tmp_path)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300  # a guard against a hang only: a loaded 2-core machine is slow
    while not list(tmp_path.glob("*/model-fp16.ckpt")):  # all written: the loads have begun
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.1)
    run.terminate()
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats: must be at least 1"),
    (["--config", "missing.yaml"], "config not found: missing.yaml"),
    (["--workdir", "README.md"], "--workdir README.md is a file, not a folder"),
    (["--workdir", "/proc"], "--workdir /proc: cannot create files in this folder"),  # was mkdtemp's traceback
])
def test_bad_input_is_one_error_line(argv, message, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--config", str(TINY_CONFIG), *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_a_misspelt_model_target_is_one_error_line_and_leaves_nothing(capsys, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text(TINY_CONFIG.read_text().replace("ddpm.LatentDiffusion\n", "ddpm.LatentDifusion\n", 1))
    (tmp_path / "work").mkdir()
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--config", str(typo), "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--config {typo}: " in err and "(did you mean LatentDiffusion?)" in err, err
    assert not any((tmp_path / "work").iterdir())


def test_a_load_that_fails_in_its_process_is_one_error_line_with_its_reason(tmp_path):
    """The child's failure was CalledProcessError's traceback, without the child's own words."""
    (tmp_path / "model.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as exit_:
        bench.load_in_child(str(TINY_CONFIG), bench.WAYS[0], str(tmp_path / "model.ckpt"))
    message = str(exit_.value)
    assert message.startswith(f"error: loading model.ckpt ({bench.WAYS[0]}) failed: ") and "\n" not in message
    assert "model.ckpt" in message.split("failed: ")[1], message  # the child's reason names the file
