"""scripts/train_adapter.py, scripts/adapter_benchmark.py and txt2img --adapter on the embedded
config, as a user runs them (subprocesses, random model weights, CPU-sized)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import REPO, load_script
from ldm.data.procedural import condition_map, sample_scene
from ldm.image_io import read_parameters
from ldm.modules.adapters import load_adapter
from test_cli import assert_ok, run

CONFIG = REPO / "configs" / "embedded" / "procedural-t2i.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 CPU training steps of a random-weights model; (adapter path, result)."""
    root = tmp_path_factory.mktemp("adapter")
    out = root / "outline.safetensors"
    result = run("train_adapter.py", "--config", CONFIG, "--random-weights", "--out", out, "--steps", 3,
                 "--batch-size", 2, "--eval-size", 2, "--num-workers", 0, "--log-every", 1, "--threads", 1)
    return out, result


def test_three_cpu_steps_write_a_loadable_adapter_and_a_report(trained):
    out, result = trained
    assert_ok(result)
    assert [line for line in result.stderr.splitlines() if "step " in line and "/3" in line][-1].count("step 3/3")
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["steps"] == 3 and [p["step"] for p in report["loss_curve"]] == [1, 2, 3]
    assert all(np.isfinite(p["loss"]) for p in report["loss_curve"])
    assert set(report["held_out"]) == {"loss_with_adapter", "loss_without_adapter"}
    assert report["timesteps"] == "cubic" and report["cond_type"] == "sketch" and report["condition"] == "outline"
    assert report["adapter"] == {"channels": [64, 64, 64, 64], "cond_channels": 1, "num_res_blocks": 2,
                                 "unshuffle": 1, "parameters": 329344}
    adapter = load_adapter(out, levels=4)  # strict, f from the header
    assert adapter.spec.unshuffle == 1 and adapter.channels == (64, 64, 64, 64)



def test_the_held_out_loss_is_over_every_eval_scene_also_past_one_batch(tmp_path, monkeypatch, caplog):
    """--eval-size scenes in batches of EVAL_BATCH (256; 2 here): the last, smaller batch counts
    too (drop_last had cut 500 to 256), weighted by its size."""
    script = load_script("train_adapter")
    monkeypatch.setattr(script, "EVAL_BATCH", 2)
    with caplog.at_level("INFO"):
        report = script.main(["--config", str(CONFIG), "--random-weights", "--out", str(tmp_path / "a.safetensors"),
                              "--steps", "1", "--batch-size", "1", "--eval-size", "3", "--num-workers", "0"])
    assert "held-out loss (3 scenes" in caplog.text
    assert all(np.isfinite(v) for v in report["held_out"].values())


def test_a_disk_that_fills_during_training_is_one_error_line(tmp_path, monkeypatch, capsys):
    import errno
    script = load_script("train_adapter")

    def disk_full(adapter, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(script, "save_adapter", disk_full)
    out = tmp_path / "a.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--config", str(CONFIG), "--random-weights", "--out", str(out), "--steps", "1",
                     "--batch-size", "1", "--eval-size", "1", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f": error: cannot write {out} ([Errno 28] No space left "
                                                 f"on device); free the space or pass another --out and train again")


@pytest.mark.parametrize("args, message", [
    (["--random-weights", "--ckpt", "{existing}"], "--ckpt and --random-weights: choose one"),
    (["--random-weights", "--out", "{existing}"], "exists; choose a new --out"),
    (["--random-weights", "--out", "x.pth"], "--out must end in .safetensors"),
    (["--random-weights", "--steps", "0"], "--steps must be at least 1"),
    (["--random-weights", "--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
    (["--ckpt", "missing.safetensors"], "checkpoint not found: missing.safetensors"),
    (["--random-weights", "--out", "{existing}/b.safetensors"], "is a file, not a folder"),
    (["--random-weights", "--out", "/proc/x/b.safetensors"], "--out /proc/x: cannot create files in this folder"),
    (["--random-weights", "--out", "/proc/b.safetensors"], "--out /proc"),  # root passes os.access there
    (["--random-weights", "--weight-decay", "-1"], "--weight-decay must be a finite number, 0 or more, got -1"),
    (["--random-weights", "--weight-decay", "inf"], "--weight-decay must be a finite number, 0 or more, got inf"),
    (["--random-weights", "--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--random-weights", "--seed", str(2**64)], "--seed must be between 0 and 4294967295"),
    (["--random-weights", "--max-minutes", "-1"], "--max-minutes must be positive, or 0 for no limit"),
    (["--random-weights", "--threads", "0"], "--threads: must be at least 1, got 0"),
    (["--random-weights", "--config", "{text}"], "is not a model config (Missing key model"),
    (["--random-weights", "--config", str(REPO / "configs/stable-diffusion/v1-tiny.yaml")],
     "not a text-to-image model with captions"),
    pytest.param(["--random-weights", "--precision", "bf16"], "--precision bf16 is for CUDA",  # --device auto
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto is cuda here")),
])
def test_bad_training_flags_are_one_error_line(tmp_path, capsys, args, message):
    existing, text = tmp_path / "a.safetensors", tmp_path / "text.txt"
    existing.write_bytes(b"")
    text.write_text("hello\n")
    script = load_script("train_adapter")
    parser = script.build_parser()
    argv = ["--config", str(CONFIG), "--out", str(tmp_path / "new.safetensors")]
    argv += [a.format(existing=existing, text=text) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        script.validate(parser, parser.parse_args(argv))
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "text.txt"]  # nothing written


def test_txt2img_takes_the_trained_adapter_on_the_embedded_config(trained, tmp_path):
    adapter, _ = trained
    cond = tmp_path / "outline.png"
    Image.fromarray((condition_map(sample_scene(3, "chair"), "outline") * 255).astype(np.uint8)).save(cond)
    result = run("txt2img.py", "--config", CONFIG, "--random-weights", "--H", 32, "--W", 32, "--C", 3, "--f", 1,
                 "--n_samples", 1, "--n_iter", 1, "--ddim_steps", 2, "--prompt", "a chair", "--skip_grid",
                 "--adapter", adapter, "--cond", cond, "--cond-type", "sketch", "--outdir", tmp_path / "out")
    assert_ok(result)
    meta = read_parameters(tmp_path / "out" / "samples" / "00000.png")["extra"]["t2i_adapter"]["adapters"][0]
    assert meta["unshuffle"] == 1 and meta["channels"] == [64, 64, 64, 64] and meta["cond_type"] == "sketch"


def test_benchmark_prints_iou_for_all_seven_settings(trained, tmp_path):
    adapter, _ = trained
    result = run("adapter_benchmark.py", "--config", CONFIG, "--random-weights", "--adapter", adapter, "--n", 2,
                 "--steps", 1, "--seeds", 0, "--prompts", "a chair", "--scale", 1, "--outdir", tmp_path)
    assert_ok(result)
    table, _, effect = result.stdout.partition("What consistent attention changes in the same batch")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| setting | IoU")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| plain", "| adapter", "| plain+all", "| adapter+all",
                                                     "| plain+anchor", "| adapter+anchor", "| adapter+image"]
    assert rows[0].split(" | ")[5] == "ref. colour"
    assert all(0 <= float(r.split(" | ")[column].split(" ")[0]) <= 1 for r in rows[1:] for column in (1, 5))
    # each sharing setting against the same batches without sharing, what it costs in IoU first
    paired = [line.split(" | ")[:3] for line in effect.splitlines() if line.startswith("| ") and "---" not in line]
    assert [p[:2] for p in paired] == [
        ["| setting", "IoU − plain"], ["| plain+all", paired[1][1]], ["| plain+anchor", paired[2][1]],
        ["| setting", "IoU − adapter"], ["| adapter+all", paired[4][1]], ["| adapter+anchor", paired[5][1]],
        ["| adapter+image", paired[6][1]]]
    assert paired[0][2] == "ref. colour − plain"
    assert "anchor = --consistent-attn's defaults: groups inner+middle, mode anchor (1 anchor); all = the same " \
           "groups, mode all" in result.stdout
    assert "(outline maps" in result.stdout  # the condition kind recorded in the adapter file
    run_dir = tmp_path / "run-001"
    assert {p.name for p in run_dir.iterdir()} == {"table.md", "results.csv", "figure.png"}
    with Image.open(run_dir / "figure.png") as figure:
        assert figure.height == 8 * (32 * 4 + 2)  # the conditions + seven settings


def test_benchmark_refuses_a_cond_tau_under_every_model_call_before_sampling(trained, tmp_path):
    """--steps 2 calls the model at 0.499 and 0.999 of the trajectory: --cond-tau 0.4 would have
    benchmarked the adapter applied at no step, every 'adapter' row a copy of 'plain'."""
    adapter, _ = trained
    result = run("adapter_benchmark.py", "--config", CONFIG, "--random-weights", "--adapter", adapter, "--n", 2,
                 "--steps", 2, "--cond-tau", 0.4, "--seeds", 0, "--prompts", "a chair", "--outdir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "error: --cond-tau 0.4 holds none of the 2 model calls of --steps 2 (the first at 0.499 of the trajectory, "
        "0 = noise, 1 = image): the adapter would change nothing; raise it to 0.499 or more or take more --steps")
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_face_prompts_in_one_line(trained, capsys):
    adapter, _ = trained
    script = load_script("adapter_benchmark")
    parser = script.build_parser()
    with pytest.raises(SystemExit):
        script.validate(parser, parser.parse_args(["--random-weights", "--adapter", str(adapter),
                                                   "--prompts", "a face with glasses"]))
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "not a procedural chair, table or shape caption" in errors[0]


@pytest.mark.parametrize("args, message", [
    (["--outdir", "{afile}"], "--outdir {afile} is a file, not a folder"),
    (["--outdir", "/proc/x"], "--outdir /proc/x: cannot create files in this folder"),
    (["--outdir", "/proc"], "--outdir /proc: "),
    (["--config", "{text}"], "is not a diffusion model config (Missing key model"),
    (["--steps", "5000"], "--steps must be below the model's 1000 training timesteps"),
    (["--adapter-weight", "nan"], "--adapter-weight must be a finite number, got nan"),
    (["--adapter", "{text}"], "--adapter: Unsupported checkpoint type '.txt'"),  # was refused once the model was built
])
def test_benchmark_bad_outdir_config_and_steps_are_one_error_line(tmp_path, capsys, args, message):
    files = {"afile": tmp_path / "afile", "text": tmp_path / "text.txt", "out": tmp_path / "out",
             "adapter": tmp_path / "adapter.safetensors"}
    files["afile"].write_text("keep me")
    files["text"].write_text("hello\n")
    save_file({"body.0.weight": torch.zeros(1)}, files["adapter"])  # read only once the input is good
    script = load_script("adapter_benchmark")
    argv = ["--config", str(CONFIG), "--random-weights", "--adapter", str(files["adapter"]), "--outdir",
            str(files["out"]), *[a.format(**files) for a in args]]
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message.format(**files) in err.strip().splitlines()[-1]
    assert files["afile"].read_text() == "keep me" and not files["out"].exists()


def test_benchmark_takes_an_adapter_folder_as_txt2img_does(tmp_path):
    """A diffusers adapter folder was refused as 'adapter not found'; the loader reads it (here an
    empty one, which the loader refuses for what it lacks)."""
    script = load_script("adapter_benchmark")
    parser = script.build_parser()
    opt = parser.parse_args(["--random-weights", "--adapter", str(tmp_path), "--outdir", str(tmp_path / "out")])
    script.validate(parser, opt)  # no SystemExit
    result = run("adapter_benchmark.py", "--config", CONFIG, "--random-weights", "--adapter", tmp_path, "--n", 2,
                 "--steps", 1, "--seeds", 0, "--outdir", tmp_path / "out")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"adapter folder {tmp_path} has no readable config.json" in result.stderr.strip().splitlines()[-1]
