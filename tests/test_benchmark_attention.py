"""The attention benchmark starts and prints its table at a reduced size on CPU."""
import subprocess
import sys


def test_benchmark_prints_a_row_per_setting_and_n():
    result = subprocess.run(
        [sys.executable, "scripts/benchmark_attention.py", "--config", "configs/stable-diffusion/v1-tiny.yaml",
         "--size", "64", "--n", "1", "2", "--repeats", "1", "--device", "cpu",
         "--settings", "vanilla einsum (upstream)", "anchor: all groups"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "setting" not in line]
    assert len(rows) == 2 * 3  # baseline + two chosen settings, for N = 1 and 2
    for row in rows:
        ms = float(row.split("|")[3])
        assert ms > 0
    assert any("anchor: all groups" in row and "|   2 |" in row for row in rows)


def test_benchmark_rejects_bad_size():
    result = subprocess.run([sys.executable, "scripts/benchmark_attention.py", "--size", "100"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "multiple of 64" in result.stderr and "Traceback" not in result.stderr
