"""--threads / set_cpu_threads: CPU runs use the cores the load average leaves free."""
import os

import pytest
import torch

from ldm.script_helpers import set_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    import ldm.script_helpers
    monkeypatch.setattr(ldm.script_helpers, "_AUTO_THREADS", None)  # decide afresh in each test
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("load,expected", [(0.7, 2), (1.2, 1), (4.0, 1)])
def test_automatic_threads_leave_busy_cores_alone(monkeypatch, load, expected):
    torch.set_num_threads(2)  # PyTorch's default on a 2-core machine
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert set_cpu_threads() == expected == torch.get_num_threads()


def test_automatic_choice_is_made_once_per_process(monkeypatch):
    # thread counts change results in the last bits: later runs in a process keep the first choice
    torch.set_num_threads(2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert set_cpu_threads() == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert set_cpu_threads() == 2


def test_explicit_threads_win(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert set_cpu_threads(2) == 2 == torch.get_num_threads()


def test_negative_threads_is_one_error_line(capsys):
    import sys
    from conftest import REPO
    sys.path.insert(0, str(REPO / "scripts"))
    import txt2img
    parser = txt2img.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        txt2img.validate_options(parser, parser.parse_args(["--random-weights", "--threads", "-1"]))
    assert exit_info.value.code == 2
    assert "--threads must be 0 (automatic) or positive" in capsys.readouterr().err.strip().splitlines()[-1]
