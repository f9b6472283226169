"""scripts/benchmark_attention.py at a reduced size on CPU: the UNet table, the end-to-end table,
the CSV, FLOP counting and its error lines. Run in-process (one torch import for all tests)."""
import csv

import pytest
import torch

from conftest import REPO, TINY_CONFIG, fill_zero_weights_, load_script

bench = load_script("benchmark_attention")



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these small models: on this project's 2 shared cores two OpenMP
    threads spin against each other and the other jobs (the file took 134 s with two threads
    under load, ~20 s with one). Restored afterwards for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = ["--config", str(TINY_CONFIG), "--size", "64", "--device", "cpu", "--dtype", "fp32", "--repeats", "1"]


def table_rows(stdout):
    return [line for line in stdout.splitlines() if line.startswith("| ") and "setting" not in line]


def test_unet_table_prints_a_row_per_setting_and_n_and_appends_the_csv(tmp_path, capsys, caplog):
    path = tmp_path / "results.csv"
    caplog.set_level("INFO", logger="benchmark_attention")
    bench.main(TINY + ["--n", "1", "2", "--settings", "vanilla einsum (upstream)", "anchor: all groups",
                       "all+subject: middle+inner", "--csv", str(path)])
    # the baseline is timed again after the settings of each N: how far the machine drifted
    assert [r.getMessage().split(":")[0] for r in caplog.records if "timed again" in r.getMessage()] == ["N=1", "N=2"]
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("# cpu") and f"torch {torch.__version__}" in header and "fp32" in header
    rows = table_rows(out)
    assert len(rows) == 2 * 4  # baseline + three chosen settings, for N = 1 and 2
    assert all(float(row.split("|")[3]) > 0 for row in rows)
    assert any("anchor: all groups" in row and "|   2 |" in row for row in rows)

    records = list(csv.DictReader(path.open()))
    assert len(records) == 8 and {r["kind"] for r in records} == {"unet"}
    assert all(float(r["gflop_call"]) > 0 and float(r["tflops"]) > 0 for r in records)
    assert [r["x_sdpa"] for r in records if r["setting"] == "vanilla sdpa"] == ["1", "1"]
    bench.main(TINY + ["--n", "1", "--settings", "vanilla sdpa", "--csv", str(path)])  # appends, one header
    assert len(list(csv.DictReader(path.open()))) == 9


def test_threads_sets_the_cpu_runs_threads_and_the_header_says_so(capsys):
    # on a busy machine --threads 1 is the faster choice (docs/benchmarks.md); the flag was missing here
    try:
        bench.main(TINY + ["--n", "1", "--settings", "vanilla sdpa", "--threads", "2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert capsys.readouterr().out.startswith("# cpu (2 threads)")


@pytest.mark.parametrize("again, level", [(dict(status="ok", ms_call=107.0), "WARNING"),
                                           (dict(status="ok", ms_call=97.0), "INFO"), (dict(status="OOM"), None)])
def test_a_baseline_that_drifted_while_the_settings_ran_is_a_warning(again, level, caplog):
    caplog.set_level("INFO", logger="benchmark_attention")
    bench.check_drift(100.0, again, n=4)
    assert [r.levelname for r in caplog.records] == ([level] if level else [])
    if level:
        assert f"N=4: vanilla sdpa timed again after the settings: {again['ms_call'] - 100:+.1f}%" in caplog.text


def test_end_to_end_table_with_and_without_sharing(tmp_path, capsys):
    path = tmp_path / "e2e.csv"
    bench.main(TINY + ["--end-to-end", "--n", "2", "--steps", "2", "--csv", str(path)])
    rows = table_rows(capsys.readouterr().out)
    assert len(rows) == 2 and "plain" in rows[0] and "--consistent-attn" in rows[1]
    records = list(csv.DictReader(path.open()))
    assert [r["kind"] for r in records] == ["end-to-end"] * 2
    assert all(float(r["images_per_s"]) > 0 and r["steps"] == "2" for r in records)


def test_flops_grow_with_the_batch_and_with_sharing():
    flops = bench.FlopCounter(str(TINY_CONFIG), torch.float32)
    setting = {s.name: s for s in bench.SETTINGS}
    plain1, plain2 = (flops(setting["vanilla sdpa"], n, 8) for n in (1, 2))  # 8² latents = 64² pixels
    assert plain2 == 2 * plain1
    # the same matmuls on other kernels (the counts differ by a few hundred FLOPs in ~5e8)
    assert flops(setting["vanilla einsum (upstream)"], 2, 8) == pytest.approx(plain2, rel=1e-4)
    extra = {(name, n): flops(setting[name], n, 8) - flops(setting["vanilla sdpa"], n, 8)
             for name in ("all: all groups", "anchor: all groups", "sample 0.25: all groups") for n in (4, 8)}
    for n in (4, 8):
        assert 0 < extra["anchor: all groups", n] < extra["all: all groups", n]
        assert 0 < extra["sample 0.25: all groups", n] < extra["all: all groups", n]
    # anchor mode costs the same per image at any batch size (O(N) per batch), joint mode more and more
    assert extra["anchor: all groups", 8] == 2 * extra["anchor: all groups", 4]
    assert extra["all: all groups", 8] > 4 * extra["all: all groups", 4]


def test_subject_setting_counts_and_times_masked_sharing(monkeypatch, capsys):
    # a UNet call's subject masks come from the call before: the first call shares nothing, so
    # counting or timing only a first call would measure vanilla attention plus the maps
    import ldm.modules.consistency as consistency
    masked_calls = []
    real = consistency.masked_joint_attention
    monkeypatch.setattr(consistency, "masked_joint_attention", lambda *a: masked_calls.append(1) or real(*a))
    subject = next(s for s in bench.SETTINGS if s.name == "all+subject: middle+inner")
    bench.FlopCounter(str(TINY_CONFIG), torch.float32)(subject, 2, 8)
    assert masked_calls
    masked_calls.clear()
    bench.main(TINY + ["--n", "2", "--settings", subject.name])
    assert masked_calls and subject.name in capsys.readouterr().out


@pytest.mark.parametrize("name", ["vanilla sdpa", bench.DEFAULT_SHARING])
def test_a_unet_call_copies_nothing_from_the_host_so_a_cuda_graph_can_capture_it(name):
    """After its first call a UNet call touches only tensors on the model's device (meta here):
    a host-to-device copy synchronises the stream, which CUDA graph capture (the graphs stage)
    refuses; the timestep embedding's frequencies were copied from the CPU at every call."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from ldm.modules.consistency import consistent_attention

    host_ops = []

    class HostOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(a, torch.Tensor)]
            if any(a.device.type != "meta" for a in tensors):
                host_ops.append(str(func))
            return out

    unet, context_dim = bench.build_unet(str(TINY_CONFIG), torch.device("meta"), torch.float32)
    setting = next(s for s in bench.SETTINGS if s.name == name)
    x, t, context = bench.unet_inputs(unet, context_dim, 2, 8, torch.device("meta"), torch.float32)
    with torch.no_grad(), consistent_attention(unet, setting.sharing, 2):
        unet(x, t, context=context)  # the first call may set things up on the device
        with HostOps():
            unet(x, t, context=context)
    assert host_ops == []


def test_unet_runs_in_the_dtype_of_its_weights():
    # the benchmark converts the UNet with .to(dtype), no autocast: the forward must follow
    unet, context_dim = bench.build_unet(str(TINY_CONFIG), torch.device("cpu"), torch.float32)
    fill_zero_weights_(unet)
    x, t, context = bench.unet_inputs(unet, context_dim, 1, 8, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        reference = unet(x, t, context=context)
        unet.to(torch.bfloat16)
        out = unet(x.bfloat16(), t, context=context.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.1)


@pytest.mark.parametrize("argv,message", [
    (["--size", "100"], "multiple of 64"),
    (["--config", str(REPO / "configs/embedded/procedural-t2i.yaml"), "--size", "36"], "multiple of 8"),
    (["--n", "0"], "--n must be at least 1"),
    (["--settings", "nope"], "unknown setting"),
    (["--config", "missing.yaml"], "config not found"),
    (["--cuda-graphs", "--device", "cpu"], "--cuda-graphs needs --device cuda"),
])
def test_bad_input_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--csv", "{folder}"], "--csv {folder} is a folder"),
    (["--csv", "/proc/x/a.csv"], "--csv /proc/x: cannot create files in this folder"),
    (["--csv", "/proc/a.csv"], "--csv /proc"),  # root passes os.access there
    (["--csv", "{text}"], "is not a CSV this benchmark wrote"),
    (["--csv", "{other_csv}"], "is not a CSV this benchmark wrote"),
    (["--csv", "{binary}"], "cannot read and append to it"),
    (["--config", "{text}"], "is not a diffusion model config (Missing key model"),
    (["--config", "{binary}"], "is not a diffusion model config"),
    (["--device", "mps"], "unsupported --device 'mps' (use cpu, cuda or cuda:N)"),
    (["--device", "banana"], "unsupported --device 'banana'"),
    (["--peak-tflops", "-5"], "--peak-tflops must be positive, got -5"),
    (["--peak-tflops", "0"], "--peak-tflops must be positive"),
    (["--end-to-end", "--steps", "5000"], "--steps must be below the model's 1000 training timesteps"),
])
def test_bad_csv_config_device_and_numbers_are_one_error_line_before_the_benchmark(tmp_path, argv, message, capsys):
    files = {"folder": tmp_path / "folder", "text": tmp_path / "text.txt", "binary": tmp_path / "bin.txt",
             "other_csv": tmp_path / "other.csv"}
    files["folder"].mkdir()
    files["text"].write_text("hello\n")
    files["binary"].write_bytes(bytes(range(256)) * 2)
    files["other_csv"].write_text("a,b\n1,2\n")
    before = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    with pytest.raises(SystemExit) as exit_info:
        bench.main(TINY + [arg.format(**files) for arg in argv])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message.format(**files) in captured.err.strip().splitlines()[-1] and "Traceback" not in captured.err
    assert not table_rows(captured.out)  # nothing was measured
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before
    assert list(files["folder"].iterdir()) == []
