"""scripts/gpu_train_embedded.sh, shrunk to a 2-step CPU run: trains, exports, samples."""
import json
import shutil

import pytest
from omegaconf import OmegaConf

from conftest import run_gpu_script

TINY = dict(MAX_STEPS="2", BATCH="4", NUM_WORKERS="0", ACCELERATOR="cpu", PRECISION="32",
            SAMPLE_STEPS="2", BENCHMARK="0")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(tmp_path, **env):
    return run_gpu_script("gpu_train_embedded.sh",
                          {"OUT": str(tmp_path / "out"), "LOGDIR": str(tmp_path / "logs"), **TINY, **env})


def test_tiny_cpu_run_fills_out_with_weights_log_and_samples(tmp_path):
    result = run(tmp_path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["metrics.csv", "procedural-t2i.json", "procedural-t2i.safetensors", "samples.png",
                     "train-tail.log"]
    assert all(p.stat().st_size < 16 * 2**20 for p in out.iterdir())
    info = json.loads((out / "procedural-t2i.json").read_text())
    assert info["global_step"] == 2 and info["ema"] is True and info["ema_text_encoder"] is True
    # the lr schedule decays over the run's MAX_STEPS, not the config's planned 3000
    (project,) = (tmp_path / "logs").glob("*_procedural-t2i/configs/*-project.yaml")
    assert OmegaConf.load(project).model.params.scheduler_config.params.cycle_lengths == [2]

    again = run(tmp_path)  # the outputs of the first run are never overwritten
    assert again.returncode == 2 and "exists" in again.stderr.strip().splitlines()[-1]


def test_an_early_training_failure_is_retried_once_without_loader_workers(tmp_path):
    """num_workers=-1 is refused by the DataLoader, as a new machine may refuse the workers' shared
    memory: the run is repeated in the main process and the lease still brings a model back."""
    result = run(tmp_path, NUM_WORKERS="-1")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "once more without loader workers, at most" in result.stdout
    assert (tmp_path / "out" / "procedural-t2i.safetensors").is_file()
    assert "num_workers" in (tmp_path / "out" / "train-tail.log").read_text()  # the first attempt's error


def test_a_late_training_failure_is_not_retried(tmp_path):
    result = run(tmp_path, NUM_WORKERS="-1", EARLY_FAILURE_SECONDS="0")
    assert result.returncode == 1 and "once more" not in result.stdout
    assert "error: training failed" in result.stderr.strip().splitlines()[-1]


def test_a_training_that_fails_after_trained_steps_still_brings_its_weights_back(tmp_path):
    """main.py saves last.ckpt when a failure follows a trained step (here the image logger's
    sampling, refused at step 3): the lease exports it, and still says the training failed."""
    logger = "lightning.callbacks.image_logger.params"
    result = run(tmp_path, MAX_STEPS="6", TRAIN_ARGS=f"{logger}.batch_frequency=3 {logger}.log_images_kwargs.ddim_steps=0")
    assert result.returncode == 1 and "error: training failed" in result.stderr
    info = json.loads((tmp_path / "out" / "procedural-t2i.json").read_text())
    assert info["global_step"] == 3 and (tmp_path / "out" / "procedural-t2i.safetensors").is_file()
    assert (tmp_path / "out" / "samples.png").is_file()
