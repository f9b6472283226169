"""--threads / set_cpu_threads: PyTorch's thread count unless the user chooses one."""
import logging

import pytest
import torch

from ldm.script_helpers import set_cpu_threads


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


CPU = torch.device("cpu")


def test_default_keeps_pytorchs_choice_whatever_the_load():
    torch.set_num_threads(2)
    assert set_cpu_threads(None, CPU) == 2 == torch.get_num_threads()


def test_explicit_threads_are_set():
    torch.set_num_threads(2)
    assert set_cpu_threads(1, CPU) == 1 == torch.get_num_threads()


def test_threads_on_another_device_are_left_alone_with_a_warning(caplog):
    torch.set_num_threads(2)
    with caplog.at_level(logging.WARNING, logger="ldm.script_helpers"):
        assert set_cpu_threads(1, torch.device("cuda")) is None
        assert set_cpu_threads(None, torch.device("cuda")) is None
    assert torch.get_num_threads() == 2
    assert [r.getMessage() for r in caplog.records] == [
        "--threads 1 ignored: it sets the CPU's threads for CPU runs, this run is on cuda"]


def test_threads_below_one_is_one_error_line(capsys):
    from conftest import load_script
    txt2img = load_script("txt2img")
    parser = txt2img.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        txt2img.validate_options(parser, parser.parse_args(["--random-weights", "--threads", "0"]))
    assert exit_info.value.code == 2
    assert "argument --threads: must be at least 1, got 0" in capsys.readouterr().err.strip().splitlines()[-1]
