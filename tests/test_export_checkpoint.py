"""scripts/export_checkpoint.py: Lightning checkpoint -> .safetensors (+ JSON sidecar) for txt2img."""
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import REPO, has_plain_file_mode, load_script

export_checkpoint = load_script("export_checkpoint")

EMBEDDED_CONFIG = REPO / "configs" / "embedded" / "procedural-t2i.yaml"

METRICS = """epoch,step,train/loss_simple_step,val/loss_simple_ema
0,9,0.5,
0,19,0.25,
0,19,,0.3
"""


def fake_run(tmp_path, sd, step=20):
    """logs/RUN/checkpoints/last.ckpt + logs/RUN/csv/version_0/metrics.csv, as main.py writes them."""
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": sd, "global_step": step, "epoch": 0, "optimizer_states": [{}]}, ckpt)
    metrics = tmp_path / "run" / "csv" / "version_0" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(METRICS)
    return ckpt


def small_state_dict():
    return {
        "model.diffusion_model.out.2.weight": torch.zeros(3, 4),
        "model_ema.diffusion_modelout2weight": torch.ones(3, 4),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.num_updates": torch.tensor(20, dtype=torch.int32),
        "cond_stage_model.transformer.embeddings.token_embedding.weight": torch.full((5, 2), 0.1),
        "alphas_cumprod": torch.linspace(0.9999, 4e-5, 1000, dtype=torch.float32),
    }


def test_ema_is_swapped_in_network_weights_are_fp16_and_sidecar_has_losses(tmp_path):
    ckpt = fake_run(tmp_path, small_state_dict())
    out = tmp_path / "model.safetensors"
    info = export_checkpoint.export(ckpt, out)
    assert has_plain_file_mode(out)
    sd = load_file(out)
    assert set(sd) == {"model.diffusion_model.out.2.weight", "alphas_cumprod",
                       "cond_stage_model.transformer.embeddings.token_embedding.weight"}
    assert torch.equal(sd["model.diffusion_model.out.2.weight"], torch.ones(3, 4, dtype=torch.float16))
    assert sd["cond_stage_model.transformer.embeddings.token_embedding.weight"].dtype == torch.float16
    assert sd["alphas_cumprod"].dtype == torch.float32  # the noise schedule keeps full precision
    sidecar = json.loads((tmp_path / "model.json").read_text())
    assert sidecar == json.loads(json.dumps(info))
    assert sidecar["global_step"] == 20 and sidecar["ema"] is True and sidecar["dtype"] == "fp16"
    assert sidecar["ema_text_encoder"] is False  # a checkpoint whose EMA covers the UNet alone
    assert sidecar["parameters"] == {"unet": 12, "text_encoder": 10}
    losses = sidecar["losses"]
    assert losses["train_loss_last"] == 0.25 and losses["train_loss_last_step"] == 19
    assert losses["train_loss_mean_last_logged"] == pytest.approx(0.375)
    assert losses["val/loss_simple_ema"] == {"step": 19, "value": 0.3}


def test_a_text_encoders_ema_is_swapped_in_where_the_checkpoint_has_one(tmp_path):
    sd = small_state_dict()
    sd["model_ema.cond_stage_modeltransformerembeddingstoken_embeddingweight"] = torch.full((5, 2), 0.2)
    info = export_checkpoint.export(fake_run(tmp_path, sd), tmp_path / "model.safetensors", dtype="fp32")
    exported = load_file(tmp_path / "model.safetensors")
    assert torch.equal(exported["cond_stage_model.transformer.embeddings.token_embedding.weight"],
                       torch.full((5, 2), 0.2))
    assert info["ema"] is True and info["ema_text_encoder"] is True
    assert not any(k.startswith("model_ema.") for k in exported)


def test_a_text_encoder_with_the_ema_of_some_of_its_weights_is_refused(tmp_path):
    sd = small_state_dict()
    sd["cond_stage_model.transformer.final_layer_norm.weight"] = torch.ones(2)
    sd["model_ema.cond_stage_modeltransformerembeddingstoken_embeddingweight"] = torch.full((5, 2), 0.2)
    with pytest.raises(export_checkpoint.CheckpointError, match="EMA weights for 1 text-encoder weights but none "
                                                                 "for 1 others .*final_layer_norm"):
        export_checkpoint.export(fake_run(tmp_path, sd), tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_no_ema_keeps_training_weights(tmp_path):
    ckpt = fake_run(tmp_path, small_state_dict())
    export_checkpoint.export(ckpt, tmp_path / "raw.safetensors", use_ema=False, dtype="fp32")
    sd = load_file(tmp_path / "raw.safetensors")
    assert torch.equal(sd["model.diffusion_model.out.2.weight"], torch.zeros(3, 4))
    assert not any(k.startswith("model_ema.") for k in sd)


def test_export_of_the_embedded_model_loads_for_sampling_with_the_ema_weights(tmp_path):
    from ldm.checkpoints import load_model_from_config
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(EMBEDDED_CONFIG)
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    with torch.no_grad():
        for buffer in model.model_ema.buffers():
            if buffer.is_floating_point() and buffer.dim() > 0:
                buffer.add_(0.5)  # EMA weights distinguishable from the training weights
    ckpt = fake_run(tmp_path, model.state_dict())
    out = tmp_path / "procedural-t2i.safetensors"
    info = export_checkpoint.export(ckpt, out)
    assert info["bytes"] < 16 * 2**20  # fits what a device session can bring back

    loaded = load_model_from_config(config, str(out))
    assert loaded.use_ema is False  # ema_scope() must not swap the random EMA copy in
    assert not any(k.startswith("model_ema.") for k in loaded.state_dict())  # nor keep it in memory
    assert info["ema"] is True and info["ema_text_encoder"] is True  # the text encoder trains: averaged too
    for name in ("model.diffusion_model.input_blocks.0.0.weight",
                 "cond_stage_model.transformer.embeddings.token_embedding.weight"):
        expected = (dict(model.named_parameters())[name] + 0.5).half().float()
        assert torch.equal(dict(loaded.named_parameters())[name], expected), name
    assert torch.equal(loaded.alphas_cumprod, model.alphas_cumprod)


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "export_checkpoint.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_refuses_to_overwrite_with_one_error_line(tmp_path):
    ckpt = fake_run(tmp_path, small_state_dict())
    out = tmp_path / "m.safetensors"
    assert run_cli(ckpt, out).returncode == 0
    before = out.read_bytes()
    result = run_cli(ckpt, out)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("export_checkpoint.py: error:")
    assert "already exists" in result.stderr and out.read_bytes() == before


def test_cli_missing_checkpoint_is_one_error_line(tmp_path):
    result = run_cli(tmp_path / "nope.ckpt", tmp_path / "m.safetensors")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "checkpoint not found" in result.stderr.strip().splitlines()[-1]
    cut = tmp_path / "cut.ckpt"  # a run killed while saving it
    cut.write_bytes(fake_run(tmp_path, small_state_dict()).read_bytes()[:-100])
    result = run_cli(cut, tmp_path / "m.safetensors")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"checkpoint: {cut} is not a whole checkpoint" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("args, message", [
    (["{ckpt}", "/proc/o2.safetensors"], "output /proc"),  # /proc exists; root passes os.access there
    (["{ckpt}", "/proc/x/o2.safetensors"], "output /proc/x: cannot create files in this folder"),
    (["{ckpt}", "{text}/m.safetensors"], "is a file, not a folder"),
    (["{ckpt}", "{out}", "--metrics", "{binary}"], "--metrics {binary} is not a readable metrics.csv"),
    (["{ckpt}", "{out}", "--metrics", "{text}"], "has none of the loss columns train/loss_simple_step, "),
    (["{ckpt}", "{out}", "--metrics", "{no_step}"], "has losses but no 'step' column"),
    (["{ckpt}", "{out}", "--metrics", "{empty}"], "--metrics {empty} is empty"),  # "I/O operation on closed file"
])
def test_cli_bad_output_and_metrics_are_one_error_line_before_reading_the_checkpoint(tmp_path, capsys, args,
                                                                                      message):
    files = {"ckpt": fake_run(tmp_path, small_state_dict()), "out": tmp_path / "m.safetensors",
             "text": tmp_path / "text.txt", "binary": tmp_path / "bin.txt", "no_step": tmp_path / "nostep.csv",
             "empty": tmp_path / "empty.csv"}
    files["text"].write_text("hello\n")
    files["binary"].write_bytes(bytes(range(256)) * 2)
    files["no_step"].write_text("epoch,val/loss_simple\n0,0.5\n")
    files["empty"].write_text("")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        export_checkpoint.main([a.format(**files) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message.format(**files) in err.strip().splitlines()[-1]
    assert sorted(tmp_path.rglob("*")) == before


def test_a_disk_that_fills_while_writing_is_one_error_line_and_leaves_no_partial_file(tmp_path, capsys,
                                                                                        monkeypatch):
    import errno

    import safetensors.torch

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    ckpt = fake_run(tmp_path, small_state_dict())
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        export_checkpoint.main([str(ckpt), str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f": error: cannot write {tmp_path / 'm.safetensors'} ([Errno 28] "
                                                  f"No space left on device)")
    assert sorted(tmp_path.rglob("*")) == before


def test_cli_refuses_a_checkpoint_without_unet_weights(tmp_path):
    from safetensors.torch import save_file
    empty = tmp_path / "nomodel.safetensors"
    save_file({"foo": torch.zeros(2)}, empty)
    result = run_cli(empty, tmp_path / "m.safetensors")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds no UNet weights" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nomodel.safetensors"]


def test_a_broken_metrics_csv_found_next_to_the_run_is_skipped_with_a_warning(tmp_path, caplog):
    ckpt = fake_run(tmp_path, small_state_dict())
    (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,lr\n0,1,0.1\n")
    info = export_checkpoint.export(ckpt, tmp_path / "m.safetensors")
    assert "losses" not in info and "has none of the loss columns" in caplog.text


def test_loss_columns_without_values_yet_are_not_an_error(tmp_path):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,lr-AdamW,train/loss_simple_step\n,0,0.0002,\n")
    assert export_checkpoint.loss_summary(metrics) == {"metrics_csv": str(metrics)}


def test_a_pruned_checkpoint_with_the_ema_counters_alone_exports_its_weights(tmp_path, caplog):
    """SD's pruned files keep model_ema.decay and num_updates, no EMA weights: the export refused
    them ('has EMA weights but none for ...'), and --no-ema called their weights raw."""
    caplog.set_level("INFO")
    sd = {k: v for k, v in small_state_dict().items() if k != "model_ema.diffusion_modelout2weight"}
    info = export_checkpoint.export(fake_run(tmp_path, sd), tmp_path / "pruned.safetensors")
    exported = load_file(tmp_path / "pruned.safetensors")
    assert info["ema"] is False and not any(k.startswith("model_ema.") for k in exported)
    assert torch.equal(exported["model.diffusion_model.out.2.weight"], torch.zeros(3, 4, dtype=torch.float16))
    assert "no EMA copy in" in caplog.text and "raw training weights" not in caplog.text


def test_a_diverged_runs_losses_are_null_in_the_sidecar(tmp_path):
    """json.dump wrote NaN and Infinity, which strict JSON readers refuse."""
    ckpt = fake_run(tmp_path, small_state_dict())
    (tmp_path / "run" / "csv" / "version_0" / "metrics.csv").write_text(
        "epoch,step,train/loss_simple_step,val/loss_simple_ema\n0,9,nan,\n0,19,inf,\n0,19,,inf\n")
    export_checkpoint.export(ckpt, tmp_path / "m.safetensors")
    sidecar = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert sidecar["losses"]["train_loss_last"] is None and sidecar["losses"]["val/loss_simple_ema"]["value"] is None
