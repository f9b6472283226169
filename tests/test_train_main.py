"""main.py (the training entry point) trains the tiny config for two steps on pytorch-lightning 2."""
import csv
import os
import subprocess
import sys

from conftest import REPO, TINY_CONFIG

DATA_CONFIG = REPO / "tests" / "configs" / "tiny-train-data.yaml"


def test_main_trains_two_steps_with_checkpoint_and_csv_log(tmp_path):
    # the procedural scenes name their keys "image" and "caption"
    overrides = ["model.params.first_stage_key=image", "model.params.cond_stage_key=caption"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), "-t",
         "--accelerator", "cpu", "--devices", "1", "--max_steps", "2", "--logdir", str(tmp_path), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (run_dir / "configs").iterdir()) == [
        "lightning.yaml", "project.yaml"]
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 2 and all(loss == loss for loss in losses)  # two finite steps
    assert any((run_dir / "csv" / "version_0" / "images" / "train").glob("samples_*.png"))


def test_main_missing_config_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--base", str(tmp_path / "nope.yaml"), "-t"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config not found" in result.stderr.strip().splitlines()[-1]


def test_a_misspelt_log_images_argument_is_one_error_line_before_training(tmp_path):
    # images are first logged after batch_frequency steps: a typo must stop the run at once,
    # not be swallowed by **kwargs or raise a TypeError hours later
    result = subprocess.run(
        [sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), "-t", "--accelerator", "cpu",
         "--logdir", str(tmp_path), "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_step=2"],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "log_images_kwargs" in last and "'ddim_step'" in last and "ddim_steps" in last, last
    assert not any(tmp_path.glob("*/checkpoints/*.ckpt"))
