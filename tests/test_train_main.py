"""main.py (the training entry point) trains the tiny config for two steps on pytorch-lightning 2;
bad input (no config, a config without model or data, a mistyped flag) is one error line."""
import csv
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, TINY_CONFIG
from ldm.data.base import Txt2ImgIterableBaseDataset
from ldm.image_io import read_parameters
from ldm.util import instantiate_from_config

DATA_CONFIG = REPO / "tests" / "configs" / "tiny-train-data.yaml"
# the tiny SD config reads SD's keys (jpg, txt); the procedural scenes are image, caption
SCENE_KEYS = ["model.params.first_stage_key=image", "model.params.cond_stage_key=caption"]


def test_main_trains_three_steps_with_checkpoint_and_csv_log(tmp_path):
    # the procedural scenes name their keys "image" and "caption". The embedded configs' checkpoints
    # (no monitor, last.ckpt every N steps), a periodic one at step 2 and the run ends at step 3,
    # between two of them, as a run stopped by max_time does: last.ckpt must hold the final
    # weights (Lightning's save_last alone keeps step 2's)
    overrides = [*SCENE_KEYS,
                 "lightning.modelcheckpoint.params.monitor=null", "lightning.modelcheckpoint.params.save_top_k=0",
                 "lightning.modelcheckpoint.params.every_n_train_steps=2"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), "-t",
         "--accelerator", "cpu", "--devices", "1", "--max_steps", "3", "--logdir", str(tmp_path), *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    from ldm.checkpoints import read_checkpoint
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
    assert sorted(p.name.rsplit("-", 1)[-1] for p in (run_dir / "configs").iterdir()) == [
        "lightning.yaml", "project.yaml"]
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # three finite steps
    assert any((run_dir / "csv" / "version_0" / "images" / "train").glob("samples_*.png"))

    # txt2img samples the run's checkpoint with the run's own config (upstream: SD v1's, then failed)
    sampled = subprocess.run([sys.executable, "scripts/txt2img.py", "--ckpt", run_dir / "checkpoints" / "last.ckpt",
                              "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
                              "--skip_grid", "--prompt", "a chair", "--outdir", tmp_path / "samples"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    meta = read_parameters(tmp_path / "samples" / "samples" / "00000.png")
    assert meta["config"].startswith(str(run_dir / "configs")) and meta["config"].endswith("-project.yaml")
    shutil.rmtree(tmp_path / "samples")  # the run folder is the only one below tmp_path, as checked below

    # --resume: the same run goes on from step 3, with its saved config and optimizer state
    stopped = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    result = subprocess.run([sys.executable, "main.py", "--resume", str(run_dir), "-t", "--accelerator", "cpu",
                             "--devices", "1", "--max_steps", "4"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == [run_dir.name]
    # seeded with --seed + the step it goes on from: with 23 again it drew the first run's scenes,
    # timesteps and noise anew (Lightning restarts the epoch)
    assert "Seed set to 26" in result.stderr and "Seed set to 23" not in result.stderr
    resumed = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    (adam,) = resumed["optimizer_states"]
    assert all(state["step"] == 4 for state in adam["state"].values())  # Adam's moments came along
    assert any(not resumed["state_dict"][k].equal(v) for k, v in stopped["state_dict"].items())
    # with SD's LambdaLinearScheduler (DATA_CONFIG): its multipliers were numpy floats, pickled as
    # the optimizer's lr, and Lightning's weights-only load refused the run's own last.ckpt
    assert type(resumed["lr_schedulers"][0]["_last_lr"][0]) is float
    # and a run saved with them still resumes (numpy scalars are allowed on resume, as in read_checkpoint)
    numpy_lr = tmp_path / "numpy-lr"
    shutil.copytree(run_dir, numpy_lr)
    checkpoint = torch.load(numpy_lr / "checkpoints" / "last.ckpt", weights_only=False)
    lr = np.float64(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"])
    checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] = checkpoint["lr_schedulers"][0]["_last_lr"][0] = lr
    torch.save(checkpoint, numpy_lr / "checkpoints" / "last.ckpt")
    result = run_main("--resume", numpy_lr, "-t", "--accelerator", "cpu", "--devices", "1", "--max_steps", "5",
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(numpy_lr / "checkpoints" / "last.ckpt")["global_step"] == 5

    # a --resume whose checkpoint does not load, or restores only in part (the weights and the step,
    # not the optimizer), fails and leaves it as it was: main.py saved last.ckpt on every failure,
    # here an untrained model, or one without its optimizer state, over the file it had to resume
    def resume_fails_and_keeps(damage):
        damaged = tmp_path / damage.__name__
        shutil.copytree(run_dir, damaged)
        damage(damaged / "checkpoints" / "last.ckpt")
        before = (damaged / "checkpoints" / "last.ckpt").read_bytes()
        result = run_main("--resume", damaged, "-t", "--accelerator", "cpu", "--devices", "1", "--max_steps", "5",
                          timeout=300)
        assert result.returncode != 0 and (damaged / "checkpoints" / "last.ckpt").read_bytes() == before

    def garbled_inside(path):  # its zip directory whole (main.py's early check passes), its pickle not
        with zipfile.ZipFile(path) as archive:
            pickled = archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
        data = path.read_bytes()
        path.write_bytes(data.replace(pickled, b"\xff" * len(pickled), 1))

    def optimizer_of_another_model(path):
        checkpoint = torch.load(path, weights_only=False)
        group = checkpoint["optimizer_states"][0]["param_groups"][0]
        group["params"] = group["params"][:-1]
        torch.save(checkpoint, path)

    resume_fails_and_keeps(garbled_inside)
    resume_fails_and_keeps(optimizer_of_another_model)


def test_main_trains_an_ldm_on_a_vq_first_stage(tmp_path):
    """Upstream's CelebA-HQ recipe (as FFHQ's and LSUN bedrooms'): the UNet learns in the latent
    space of a VQ autoencoder, and the image log decodes samples through its codebook."""
    result = subprocess.run(
        [sys.executable, "main.py", "--base", "configs/latent-diffusion/celebahq-ldm-vq-4.yaml",
         str(REPO / "tests" / "configs" / "tiny-vq-ldm-train.yaml"), "-t", "--accelerator", "cpu", "--devices", "1",
         "--max_steps", "1", "--logdir", str(tmp_path)],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    from ldm.checkpoints import read_checkpoint
    weights = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert weights["global_step"] == 1
    assert weights["state_dict"]["first_stage_model.quantize.embedding.weight"].shape == (16, 3)
    logged = {p.name.split("_gs-")[0] for p in (run_dir / "csv" / "version_0" / "images" / "train").iterdir()}
    assert {"samples", "samples_x0_quantized", "samples_inpainting", "samples_outpainting"} <= logged, logged


@pytest.mark.skipif(importlib.util.find_spec("pudb") is not None, reason="pudb would open its full-screen UI")
def test_signals_save_a_checkpoint_and_open_a_debugger_during_training(tmp_path):
    """Upstream's hooks for cluster jobs: SIGUSR1 saves last.ckpt at the current step, SIGUSR2
    opens a debugger (pdb where pudb is not installed: it raised ImportError into the training
    step), and the run goes on to its last step after `c`."""
    overrides = [*SCENE_KEYS,
                 "lightning.modelcheckpoint.params.monitor=null", "lightning.modelcheckpoint.params.save_top_k=0",
                 "lightning.callbacks.image_logger.params.batch_frequency=1000"]
    process = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), "-t", "--no-test",
         "--accelerator", "cpu", "--devices", "1", "--max_steps", "20", "--logdir", str(tmp_path), *overrides],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob("*/configs/*-project.yaml")):  # saved as fit starts, handlers in place
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGUSR1)
        process.send_signal(signal.SIGUSR2)
        out, err = process.communicate("c\n", timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, err[-3000:]
    assert "(Pdb)" in out, out[-2000:]
    steps = [int(line.rsplit(" ", 1)[-1].rstrip(".")) for line in err.splitlines() if "last.ckpt at step" in line]
    assert len(steps) == 2 and steps[0] < 20 == steps[1], err[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("pudb") is not None, reason="pudb would open its full-screen UI")
def test_debug_opens_a_post_mortem_and_moves_the_run_to_debug_runs(tmp_path):
    # a UNet whose cross-attention expects 16-wide text features where the text encoder gives 32:
    # nothing reads both before the first step, which fails in the cross-attention's key projection
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "-d", "--accelerator", "cpu", "--devices", "1",
                      "--max_steps", "2", "--logdir", tmp_path, "model.params.first_stage_key=image",
                      "model.params.cond_stage_key=caption", "model.params.unet_config.params.context_dim=16",
                      timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "RuntimeError: mat1 and mat2 shapes cannot be multiplied" in result.stderr, result.stderr[-3000:]
    assert "(Pdb)" in result.stdout  # pdb where pudb is not installed
    (run,) = (tmp_path / "debug_runs").iterdir()
    assert [p.name for p in tmp_path.iterdir()] == ["debug_runs"] and any((run / "configs").iterdir())
    assert not (run / "checkpoints" / "last.ckpt").exists()  # it failed before its first step: nothing to save


def test_debug_opens_a_post_mortem_for_a_bug_before_the_trainer_exists(tmp_path):
    """A dataset's bug, met when main.py checks the data, before the trainer is built: -d opened no
    debugger (it asked the trainer for its rank)."""
    (tmp_path / "buggy_data.py").write_text("from ldm.data.procedural import ProceduralScenes\n\n\n"
                                            "class Buggy(ProceduralScenes):\n"
                                            "    def __getitem__(self, i):\n"
                                            "        raise RuntimeError('a bug in the dataset')\n")
    result = subprocess.run([sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), "-t", "-d",
                             "--accelerator", "cpu", "--logdir", str(tmp_path / "logs"), *SCENE_KEYS,
                             "data.params.train.target=buggy_data.Buggy"],
                            cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(tmp_path)),
                            input="", capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "RuntimeError: a bug in the dataset" in result.stderr, result.stderr[-3000:]
    assert "(Pdb)" in result.stdout
    assert not (tmp_path / "logs").exists()


def test_main_missing_config_is_one_error_line(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--base", str(tmp_path / "nope.yaml"), "-t"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config not found" in result.stderr.strip().splitlines()[-1]


def test_resuming_a_missing_run_is_one_error_line_saying_what_to_pass(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--resume", str(tmp_path / "logs" / "gone"), "-t"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"main.py: error: --resume {tmp_path / 'logs' / 'gone'}: not found; pass a run's log folder "
        f"(logs/<run>) or a checkpoint in it (logs/<run>/checkpoints/last.ckpt)")


def test_resuming_a_run_without_last_ckpt_is_one_error_line_naming_its_checkpoints(tmp_path):
    # a run that stopped before its first save: Lightning's FileNotFoundError came after the model was built
    run = tmp_path / "logs" / "run"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "project.yaml").write_text(TINY_CONFIG.read_text())
    (run / "checkpoints").mkdir()

    assert_one_error_line(run_main("--resume", run, "-t"), f"main.py: error: --resume {run}: no checkpoints/last.ckpt "
                          "in it (the run stopped before it saved one); start a new run")
    (run / "checkpoints" / "epoch=0-step=500.ckpt").touch()
    assert_one_error_line(run_main("--resume", run, "-t"),
                          f"pass one of its other checkpoints instead: {run / 'checkpoints' / 'epoch=0-step=500.ckpt'}")

    # one cut off while it was saved (a run killed then): Lightning's traceback, after the model was built
    (run / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut off")
    assert_one_error_line(run_main("--resume", run, "-t"), f"{run / 'checkpoints' / 'last.ckpt'} is not a whole "
                          f"checkpoint", f"Pass one of its other checkpoints instead: {run / 'checkpoints' / 'epoch'}")
    # given by a relative path, the damaged file is not offered as the way out
    relative = os.path.relpath(run / "checkpoints" / "last.ckpt", REPO)
    result = run_main("--resume", relative, "-t")
    assert_one_error_line(result, "is not a whole checkpoint")
    assert result.stderr.strip().endswith(f"instead: {run / 'checkpoints' / 'epoch=0-step=500.ckpt'}")
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == b"PK\x03\x04 cut off"


def test_a_checkpoint_outside_a_run_is_resumed_only_into_a_new_run(tmp_path):
    # upstream took the folder two levels above the file as the run: its configs, and where to log
    loose = tmp_path / "downloads" / "model.ckpt"
    loose.parent.mkdir()
    loose.write_bytes(b"PK\x03\x04 not read")
    assert_one_error_line(run_main("--resume", loose, "-t"), f"--resume {loose}: not a checkpoint of a run",
                          f"--base CONFIG.yaml --resume_from_checkpoint {loose}")
    for given, problem in ((tmp_path / "none.ckpt", "not found"), (loose, "is not a whole checkpoint")):
        assert_one_error_line(run_main("--base", TINY_CONFIG, DATA_CONFIG, "--resume_from_checkpoint", given, "-t",
                                       "--logdir", tmp_path / "logs"), f"--resume_from_checkpoint {given}: ", problem)
    assert not (tmp_path / "logs").exists()


def test_a_misspelt_log_images_argument_is_one_error_line_before_training(tmp_path):
    # images are first logged after batch_frequency steps: a typo must stop the run at once,
    # not be swallowed by **kwargs or raise a TypeError hours later
    result = subprocess.run(
        [sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), "-t", "--accelerator", "cpu",
         "--logdir", str(tmp_path), *SCENE_KEYS,
         "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_step=2"],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "log_images_kwargs" in last and "'ddim_step'" in last and "ddim_steps" in last, last
    assert "Merged modelckpt-cfg" not in result.stderr and "GPU available" not in result.stderr, result.stderr
    assert not any(tmp_path.glob("*/checkpoints/*.ckpt"))


def test_resuming_a_run_that_max_time_stopped_trains_on_for_max_time_again(tmp_path):
    """lightning.trainer.max_time caps one command (scripts/gpu_train_embedded.sh sets it for every
    run), and the run's saved config keeps it: Lightning's Timer counted the time spent before the
    --resume too, so the resumed run stopped at once, no step trained, exit status 0."""
    overrides = [*SCENE_KEYS,
                 "lightning.trainer.max_time=00:00:00:01"]
    common = ["-t", "--no-test", "--accelerator", "cpu", "--devices", "1", "--max_steps", "1000"]
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, *common, "--logdir", tmp_path, *overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = tmp_path.iterdir()
    from ldm.checkpoints import read_checkpoint
    stopped = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= stopped < 1000
    result = run_main("--resume", run_dir, *common, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] > stopped


def run_main(*args, timeout=120):
    # empty stdin: a debugger that opens reads end-of-file and quits instead of waiting for a terminal
    return subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          input="", capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(result, *words):
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Merged modelckpt-cfg" not in result.stderr, "the run's setup is logged once everything is checked"
    last = result.stderr.strip().splitlines()[-1]
    assert all(w in last for w in words), last


def test_main_without_train_and_nothing_to_test_is_one_error_line(tmp_path):
    """Without -t main.py only tests, and no config here has test data: it built the model and data,
    made a run folder, printed the learning rate and exited 0 having done nothing."""
    assert_one_error_line(run_main("--base", TINY_CONFIG, DATA_CONFIG, "--logdir", tmp_path / "logs"),
                          "nothing to run", "-t (--train)", "data.params.test")
    assert_one_error_line(run_main("--base", TINY_CONFIG, DATA_CONFIG, "--no-test", "--logdir", tmp_path / "logs"),
                          "nothing to run", "--no-test skips")
    assert not (tmp_path / "logs").exists()


def test_main_with_a_text_file_as_config_is_one_error_line(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("just some notes\nnot a config\n")
    result = run_main("-t", "--base", text, "--logdir", tmp_path / "logs", "-p", "myproject")
    assert_one_error_line(result, str(text), "has no `model:` section", "procedural-t2i.yaml")
    assert not (tmp_path / "logs").exists()
    # upstream's -p never did anything; it is still accepted, and says so
    assert "WARNING main: -p/--project has no effect" in result.stderr, result.stderr[-2000:]


def test_main_rejects_a_mistyped_flag_and_names_the_right_one(tmp_path):
    # parse_known_args used to hand it to OmegaConf.from_dotlist (keys '--max-steps' and '10')
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--accelerator", "cpu", "--max-steps", "10",
                      "--logdir", tmp_path, "data.params.batch_size=2")
    assert_one_error_line(result, "unknown option --max-steps", "did you mean --max_steps?")
    assert not any(tmp_path.iterdir())


# the checks themselves, in-process (each subprocess above pays for importing torch and lightning)

@pytest.fixture(scope="module")
def main_module():
    import main
    return main


def error_line(capsys, function, *args):
    with pytest.raises(SystemExit) as exit_info:
        function(*args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_trainer_value_of_the_wrong_type_is_named(main_module):
    """Lightning said "'<' not supported between instances of 'str' and 'int'" for max_steps=abc."""
    misfits = main_module.values_the_trainer_does_not_take
    assert misfits({"max_steps": "abc", "max_epochs": None, "precision": "bf16-mixed", "devices": [0, 1],
                    "gradient_clip_val": 1, "benchmark": True, "val_check_interval": "0:01:00",
                    "accelerator": "cpu", "no_such_option": "x"}) == ["max_steps='abc' (takes int)"]
    precision, *others = misfits({"precision": 8, "gradient_clip_val": "1.0", "benchmark": "yes"})
    assert others == ["gradient_clip_val='1.0' (takes int, float or None)", "benchmark='yes' (takes bool or None)"]
    # the values Lightning takes for precision grow with its versions
    assert precision.startswith("precision=8 (takes 64, 32, 16, ") and "'bf16-mixed', " in precision
    assert precision.endswith(" or None)")


def test_image_logging_puts_every_submodule_back_in_its_mode(main_module):
    """A part kept in eval mode while the rest trains (an autoencoder's LPIPS) stays so: upstream's
    ImageLogger called train() after logging, and LPIPS's dropout made the perceptual loss random."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    model[1].eval()
    with main_module.evaluation_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize("gpus, expected", [
    ("0,", {"accelerator": "gpu", "devices": [0]}),  # upstream's command: the GPU with id 0 (it trained on the CPU)
    ("0,1", {"accelerator": "gpu", "devices": [0, 1]}),
    ("2", {"accelerator": "gpu", "devices": 2}),
    (2, {"accelerator": "gpu", "devices": 2}),
    ("-1", {"accelerator": "gpu", "devices": -1}),  # every GPU
    ("0", {"accelerator": "cpu"}),
    (0, {"accelerator": "cpu"}),
])
def test_lightning_1_gpus_mean_what_they_meant(main_module, gpus, expected):
    trainer_config = {"gpus": gpus, "max_steps": 3}
    assert main_module.trainer_config_from_args(trainer_config) is None
    assert trainer_config == {**expected, "max_steps": 3}


@pytest.mark.parametrize("devices, expected", [("0,1", [0, 1]), ([0, 1], [0, 1]), ("2", 2), (2, 2), ("auto", "auto")])
def test_devices_from_the_command_line_or_a_config(main_module, devices, expected):
    # a config's `devices: [0, 1]` arrives as a list (it was turned into the string "[0, 1]" and failed)
    trainer_config = {"devices": devices}
    main_module.trainer_config_from_args(trainer_config)
    assert trainer_config == {"devices": expected}


def test_whole_numbers_that_yaml_reads_as_floats_are_the_counts_lightning_takes(main_module):
    """`max_steps: 1e6` in a config (or lightning.trainer.max_steps=2e0) is a float to OmegaConf;
    Lightning trains with it, and the type check must not refuse it."""
    trainer_config = {"max_steps": 2.0, "accumulate_grad_batches": 2.0, "max_epochs": 1e2, "gradient_clip_val": 1.0,
                      "limit_val_batches": 1.0, "val_check_interval": 0.25}
    main_module.trainer_config_from_args(trainer_config)
    assert trainer_config == {"max_steps": 2, "accumulate_grad_batches": 2, "max_epochs": 100,
                              "gradient_clip_val": 1.0, "limit_val_batches": 1.0, "val_check_interval": 0.25}
    assert all(type(trainer_config[k]) is int for k in ("max_steps", "accumulate_grad_batches", "max_epochs"))
    assert main_module.values_the_trainer_does_not_take(trainer_config) == []
    fraction = {"max_steps": 2.5}
    main_module.trainer_config_from_args(fraction)
    assert main_module.values_the_trainer_does_not_take(fraction) == ["max_steps=2.5 (takes int)"]


@pytest.mark.parametrize("overrides, key, name", [
    ([], "jpg", "first_stage_key"),  # SD's keys against the procedural scenes' image/caption
    (["model.params.first_stage_key=image"], "txt", "cond_stage_key"),
])
def test_data_without_the_keys_the_model_reads_is_one_error_line(tmp_path, overrides, key, name):
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--accelerator", "cpu", "--logdir", tmp_path, *overrides)
    assert_one_error_line(result, f"the train data has no '{key}', which the model reads (model.params.{name}); "
                                  f"its samples have 'image', 'caption'", f"pass model.params.{name}=<one of them>")
    assert "GPU available" not in result.stderr, "the data is checked before Lightning's trainer says anything"
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("setting, value, choices", [("loss_type", "l3", "'l1', 'l2'"),
                                                     ("parameterization", "v", "'eps', 'x0'"),
                                                     ("conditioning_key", "crossatn", "None, 'concat', 'crossattn'")])
def test_a_setting_outside_its_choices_is_one_error_line_before_training(tmp_path, setting, value, choices):
    # upstream: an assert, or (loss_type) a NotImplementedError at the first training step
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--accelerator", "cpu", "--logdir", tmp_path,
                      f"model.params.{setting}={value}")
    assert_one_error_line(result, f"main.py: error: model.params.{setting} is '{value}'; it takes one of {choices}",
                          f"(set in {TINY_CONFIG}, {DATA_CONFIG} or an override)")
    assert not any(tmp_path.iterdir())


def test_images_the_model_cannot_halve_evenly_are_one_error_line(tmp_path):
    # v1-tiny's KL first stage and UNet halve 3 + 3 times: 72 px came back 8 px short at the first
    # step (RuntimeError: Sizes of tensors must match, in the UNet's skip connection)
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--accelerator", "cpu", "--logdir", tmp_path,
                      *SCENE_KEYS,
                      "data.params.train.params.size=72")
    assert_one_error_line(result, "the train data's images ('image') are 72x72 pixels", "multiples of 64",
                          "sides such as 64", "data.params.train.params.size")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("config, multiple", [
    ("configs/stable-diffusion/v1-tiny.yaml", 64),             # KL autoencoder 8x, UNet 8x
    ("configs/embedded/procedural-t2i-16px.yaml", 8),          # pixel space, UNet 8x
    ("tests/configs/tiny-autoencoder-train.yaml", 2),          # the autoencoder itself, 2x
    ("configs/latent-diffusion/celebahq-ldm-vq-4.yaml", 32),   # VQ autoencoder 4x, UNet 8x
])
def test_image_side_multiple_counts_every_halving(main_module, config, multiple):
    from omegaconf import OmegaConf
    model_config = OmegaConf.load(REPO / config).model
    model_config.params.pop("ckpt_path", None)
    model_config.params.get("first_stage_config", {}).get("params", {}).pop("ckpt_path", None)
    model = instantiate_from_config(model_config)
    assert main_module.image_side_multiple(model) == multiple


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_gpu_without_cuda_is_one_error_line(tmp_path):
    assert_one_error_line(run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--gpus", "0,", "--logdir", tmp_path),
                          "asks for a GPU", "CUDA is not available here", "--accelerator cpu")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flag", ["-r", "-n"])
def test_resume_or_name_without_a_value_is_one_error_line(main_module, capsys, flag):
    # upstream took them alone as True: -n named the run "..._True", -r died on True.rstrip
    last = error_line(capsys, main_module.get_parser().parse_known_args, ["-t", flag])
    assert last.endswith(": expected one argument"), last


def test_no_config_is_one_error_line(main_module, capsys):
    last = error_line(capsys, main_module.load_config, main_module.get_parser(), [], [])
    assert "no --base config given (pass a training config such as configs/embedded/procedural-t2i.yaml)" in last


@pytest.mark.parametrize("content, words", [
    ("", ["has no `model:` section"]),
    ("model: [1\ndata: 2\n", ["cannot read", "as YAML", "line 2"]),
    ("model:\n  target: a.B\n\tdata: 2\n", ["cannot read", "as YAML", "line 3"]),  # a tab
    ("- model\n- data\n", ["is not a YAML mapping"]),
    ("model: some.Model\n", ["the `model:` section", "has no `target:`"]),
    ("model:\n  target: some.Model\n", ["has no `data:` section"]),
])
def test_a_config_that_cannot_train_is_one_error_line(main_module, capsys, tmp_path, content, words):
    path = tmp_path / "config.yaml"
    path.write_text(content)
    last = error_line(capsys, main_module.load_config, main_module.get_parser(), [str(path)], [])
    assert str(path) in last and all(w in last for w in words), last


def test_the_merged_configs_and_overrides_are_checked(main_module, capsys, tmp_path):
    model, data = tmp_path / "model.yaml", tmp_path / "data.yaml"
    model.write_text("model:\n  base_learning_rate: 1.0e-4\n  target: some.Model\n")
    data.write_text("data:\n  target: main.DataModuleFromConfig\n")
    parser = main_module.get_parser()
    config = main_module.load_config(parser, [str(model), str(data)], ["data.params.batch_size=4"])
    assert config.model.target == "some.Model" and config.data.params.batch_size == 4
    # an override may supply a section; neither file having it is an error naming both
    assert main_module.load_config(parser, [str(model)], ["data.target=x.Y"]).data.target == "x.Y"
    last = error_line(capsys, main_module.load_config, parser, [str(data), str(data)], [])
    assert last.endswith(f"none of {data}, {data} has a `model:` section "
                         "(pass a training config such as configs/embedded/procedural-t2i.yaml)"), last
    last = error_line(capsys, main_module.load_config, parser, [str(model), str(data)], ["model.params=3"])
    assert "`model.params` must be a mapping of the target's arguments, got 3" in last, last


@pytest.mark.parametrize("args, words", [
    (["--maxsteps", "3"], ["unknown option --maxsteps", "did you mean --max_steps?"]),
    (["--max-steps=3"], ["unknown option --max-steps", "did you mean --max_steps?"]),
    (["-x"], ["unknown option -x", "KEY=VALUE"]),
    (["data.params.batch_size=4", "stray"], ["unexpected argument 'stray'", "KEY=VALUE"]),
    (["seed"], ["unexpected argument 'seed'", "did you mean --seed?"]),
])
def test_leftover_arguments_must_be_overrides(main_module, capsys, args, words):
    parser = main_module.get_parser()
    opt, unknown = parser.parse_known_args(["--base", "a.yaml", "-t", "--logdir", "logs", *args])
    last = error_line(capsys, main_module.check_overrides, parser, unknown)
    assert all(w in last for w in words), last


def test_overrides_pass_the_check(main_module):
    # what scripts/gpu_train_embedded.sh and models/embedded/README.md pass
    parser = main_module.get_parser()
    args = ["--base", "a.yaml", "-t", "--no-test", "--accelerator", "cpu", "--max_steps", "3", "--logdir", "logs",
            "data.params.batch_size=4", "lightning.trainer.max_time=00:00:07:30",
            "model.params.scheduler_config.params.warm_up_steps=[5]"]
    opt, unknown = parser.parse_known_args(args)
    main_module.check_overrides(parser, unknown)
    assert opt.max_steps == 3 and len(unknown) == 3


def test_an_override_swallowed_by_a_flag_is_explained(main_module, capsys):
    parser = main_module.get_parser()
    last = error_line(capsys, parser.parse_known_args, ["--base", "a.yaml", "-t", "data.params.batch_size=4"])
    assert "got 'data.params.batch_size=4'" in last and "--logdir" in last, last
    last = error_line(capsys, main_module.load_config, parser, ["data.params.batch_size=4"], [])
    assert "config not found: data.params.batch_size=4 (a KEY=VALUE override?" in last, last


def test_a_parameter_the_model_does_not_take_is_one_error_line_and_a_bug_keeps_its_traceback(main_module, capsys):
    from omegaconf import OmegaConf
    parser = main_module.get_parser()
    misspelt = OmegaConf.create({"target": "ldm.modules.attention.GEGLU",
                                 "params": {"dim_in": 2, "dim_out": 2, "dim_outt": 2}})
    last = error_line(capsys, main_module.build_model, parser, misspelt, ["cfg.yaml"])
    assert last.endswith("error: ldm.modules.attention.GEGLU does not take the config's parameters as given: "
                         "GEGLU.__init__() got an unexpected keyword argument 'dim_outt' (set in cfg.yaml or an "
                         "override)"), last
    broken = OmegaConf.create({"target": "ldm.modules.attention.GEGLU", "params": {"dim_in": "2", "dim_out": 2}})
    with pytest.raises(TypeError):  # not a config key: raised inside the constructor
        main_module.build_model(parser, broken, ["cfg.yaml"])


def test_fine_tuning_the_shipped_model_starts_its_ema_from_the_shipped_weights():
    """The README's `model.params.ckpt_path=FILE` on the exported 16 px model (use_ema: true, no
    model_ema.* in the file): the EMA that validation samples with is those weights, not noise,
    for the UNet and the text encoder (averaged too, as it trains)."""
    from omegaconf import OmegaConf
    from ldm.checkpoints import load_state_dict
    config = OmegaConf.load(REPO / "configs/embedded/procedural-t2i-16px.yaml").model
    weights = REPO / "models/embedded/procedural-t2i-16px.safetensors"
    config.params.ckpt_path = str(weights)
    model = instantiate_from_config(config)
    shipped = load_state_dict(weights)
    with model.ema_scope():  # the UNet's and the text encoder's
        ours = model.state_dict()
        for name, tensor in shipped.items():
            if name.startswith(("model.", "cond_stage_model.")):
                assert torch.equal(ours[name], tensor.to(ours[name].dtype)), name


def data_module(train):
    return OmegaConf.create({"target": "main.DataModuleFromConfig", "params": {"batch_size": 1, "train": train}})


def test_data_that_cannot_be_built_is_one_error_line(main_module, capsys, tmp_path, monkeypatch):
    """Upstream's LSUN and ImageNet configs read data/ folders a fresh clone lacks, and ImageNet's
    dataset imports packages this fork does not install: tracebacks until now."""
    parser = main_module.get_parser()
    missing = tmp_path / "church_outdoor_train.txt"
    lsun = data_module({"target": "ldm.data.lsun.LSUNBase", "params": {"txt_file": str(missing), "data_root": "x"}})
    assert error_line(capsys, main_module.build_data, parser, lsun).endswith(
        f"error: the data cannot be read: No such file or directory: {missing} (the config's data.params say where "
        "it is read from)")
    (tmp_path / "needs_a_package.py").write_text("import a_package_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert error_line(capsys, main_module.build_data, parser, data_module({"target": "needs_a_package.Data"})).endswith(
        "error: the data needs the package a_package_not_installed (pip install a_package_not_installed)")
    assert error_line(capsys, main_module.build_data, parser, data_module({"target": "ldm.data.lsunn.LSUNBase"})).endswith(
        "error: data: target ldm.data.lsunn.LSUNBase: there is no module ldm.data.lsunn")
    (tmp_path / "no_folder.py").write_text("class Data:\n    def __init__(self):\n        raise FileNotFoundError("
                                           "'Couldn\\'t find any class folder in /data/x.')\n")
    assert error_line(capsys, main_module.build_data, parser, data_module({"target": "no_folder.Data"})).endswith(
        "error: the data cannot be read: Couldn't find any class folder in /data/x. (the config's data.params say "
        "where it is read from)")  # a message alone: it printed ': None' for the file it has not


@pytest.mark.parametrize("override, words", [
    ("model.params.unet_config.target=ldm.modules.diffusionmodules.openaimodel.UNetModle",
     "ldm.modules.diffusionmodules.openaimodel has no UNetModle (did you mean UNetModel?)"),
    ("lightning.callbacks.image_logger.params.batch_frequncy=1",
     "lightning.callbacks.image_logger: main.ImageLogger does not take the config's parameters as given"),
    ("lightning.callbacks.extra.params.x=1", "lightning.callbacks.extra: a config section has no `target:` to build "
                                            "(it holds params)"),
    ("lightning.trainer.max_step=1", "lightning.trainer: Trainer.__init__() got an unexpected keyword argument 'max_step'"),
])
def test_a_misspelt_target_parameter_or_trainer_option_is_one_error_line(tmp_path, override, words):
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--accelerator", "cpu", "--logdir", tmp_path,
                      *SCENE_KEYS, override)
    assert_one_error_line(result, words)
    assert not any(tmp_path.iterdir())


def test_a_run_on_two_devices_saves_its_last_checkpoint(tmp_path):
    """last.ckpt was saved on rank 0 alone, and Lightning's save waits for every rank: a run on
    several devices failed at its end (here two CPU processes, DDP over gloo)."""
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--no-test", "--accelerator", "cpu", "--devices", "2",
                      "--strategy", "ddp", "--max_steps", "2", "--logdir", tmp_path, "model.params.first_stage_key=image",
                      "model.params.cond_stage_key=caption", "lightning.callbacks.image_logger.params.batch_frequency=1000",
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2


class StandInTrainer:
    """What main.py's saving callbacks use of a Trainer; save_checkpoint records the step saved."""
    global_rank = 0

    def __init__(self):
        self.global_step, self.saved = 0, []
        self.strategy = types.SimpleNamespace(reduce_boolean_decision=lambda decision, all=True: decision)

    def save_checkpoint(self, path, weights_only=False):
        self.saved.append((os.path.basename(path), self.global_step, weights_only))


def test_ctrl_c_saves_only_what_this_run_trained(main_module):
    """Upstream saved on Ctrl-C whatever the model held: interrupting a --resume before Lightning had
    restored its checkpoint wrote an untrained model over the run's last.ckpt."""
    trainer, start = StandInTrainer(), main_module.TrainingStart("ckpts")
    start.on_exception(trainer, None, KeyboardInterrupt())  # before training started
    trainer.global_step = 40  # restored by --resume
    start.on_train_start(trainer, None)
    start.on_exception(trainer, None, KeyboardInterrupt())  # nothing trained since
    assert trainer.saved == []
    trainer.global_step = 41
    start.on_exception(trainer, None, RuntimeError())  # main.py's own except saves those
    start.on_exception(trainer, None, KeyboardInterrupt())
    assert trainer.saved == [("last.ckpt", 41, False)]


def test_sigusr1_saves_at_the_end_of_the_step_not_inside_the_handler(main_module):
    """The handler can run while validation has the EMA weights swapped in, which upstream saved as
    the trained weights: it only asks, and the step's end saves, once."""
    trainer, on_signal = StandInTrainer(), main_module.SaveOnSignal("ckpts")
    on_signal.request(signal.SIGUSR1, None)
    assert trainer.saved == []
    trainer.global_step = 7
    for _ in range(2):
        on_signal.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.saved == [("last.ckpt", 7, False)]


def test_a_new_run_never_shares_an_earlier_runs_folder(main_module, tmp_path):
    """Runs are named to the second: two started within one second under one name shared a folder,
    the second overwriting the first's configs and last.ckpt."""
    name = "2026-12-07T03-00-00_v1-tiny"
    assert main_module.new_run_name(tmp_path / "logs", name) == name  # no logs folder yet
    (tmp_path / name).mkdir()
    assert main_module.new_run_name(tmp_path, name) == f"{name}-2"
    (tmp_path / f"{name}-2").mkdir()
    assert main_module.new_run_name(tmp_path, name) == f"{name}-3"


def test_ema_averages_once_per_optimizer_step_when_batches_accumulate(tmp_path):
    """Upstream updated the EMA after every batch: with accumulate_grad_batches 2, twice a step."""
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, "-t", "--no-test", "--accelerator", "cpu", "--devices", "1",
                      "--max_steps", "3", "--accumulate_grad_batches", "2", "--logdir", tmp_path,
                      "model.params.use_ema=true", "model.params.first_stage_key=image",
                      "model.params.cond_stage_key=caption", "lightning.callbacks.image_logger.params.batch_frequency=1000",
                      timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 3 and checkpoint["state_dict"]["model_ema.num_updates"] == 3


def test_a_run_saved_before_its_text_encoder_was_averaged_resumes(tmp_path):
    """--resume loads the state dict strictly: a last.ckpt whose EMA covers the UNet alone (the EMA
    of a trained text encoder came on 2026-12-07; upstream's cin-ldm-vq-f8 trains its class
    embedder) goes on, the encoder's EMA starting at its weights."""
    common = ["-t", "--no-test", "--accelerator", "cpu", "--devices", "1"]
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, *common, "--max_steps", "1", "--logdir", tmp_path,
                      "model.params.use_ema=true", "model.params.cond_stage_trainable=true",
                      "model.params.cond_stage_config.params.trainable=true", "model.params.first_stage_key=image",
                      "model.params.cond_stage_key=caption",
                      "lightning.callbacks.image_logger.params.batch_frequency=1000", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    text_ema = [k for k in checkpoint["state_dict"] if k.startswith("model_ema.cond_stage_model")]
    assert text_ema
    for key in text_ema:
        del checkpoint["state_dict"][key]
    torch.save(checkpoint, last)
    result = run_main("--resume", run, *common, "--max_steps", "2", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 2 and set(text_ema) <= set(resumed["state_dict"])

    # an override that changes the model: one error line before training, last.ckpt untouched
    before = last.read_bytes()
    assert_one_error_line(run_main("--resume", run, *common, "--max_steps", "3", "model.params.use_ema=false"),
                          f"--resume {run}", "its weights do not fit the model the configs build", "not in this model",
                          "model_ema.", "KEY=VALUE overrides changed")
    assert last.read_bytes() == before


def test_trainer_flags_mean_what_they_meant_in_lightning_1(main_module, capsys):
    """`--limit_val_batches 1` is one batch and `1.0` all of them (a float type made both all);
    a second -b adds configs (it replaced the first); a mistyped boolean is an error (it was False)."""
    parser = main_module.get_parser()
    opt, _ = parser.parse_known_args(["--limit_val_batches", "1", "--val_check_interval", "0.5",
                                      "--limit_train_batches", "1.0", "-b", "a.yaml", "-t", "-b", "b.yaml"])
    assert (opt.limit_val_batches, opt.val_check_interval, opt.limit_train_batches) == (1, 0.5, 1.0)
    assert type(opt.limit_val_batches) is int and type(opt.limit_train_batches) is float
    assert opt.base == ["a.yaml", "b.yaml"]
    assert "Boolean value expected, got 'treu'" in error_line(capsys, parser.parse_known_args, ["--benchmark", "treu"])


@pytest.mark.parametrize("override, words", [
    ("lightnig.trainer.max_epochs=0", "an override sets lightnig, which main.py does not read: did you "
                                      "mean lightning?"),
    ("model.base_learing_rate=5.0", "sets model.base_learing_rate, which main.py does not read: did you mean "
                                    "model.base_learning_rate?"),
    ("lightning.trainr.max_steps=1", "did you mean lightning.trainer?"),
    ("model.base_learning_rate=null", "model.base_learning_rate must be a positive number"),
    ("model.base_learning_rate=fast", "got 'fast'"),
])
def test_a_key_main_py_does_not_read_is_one_error_line(main_module, capsys, override, words):
    """Upstream trained without such a key and saved it into the run's configs as if it had applied."""
    parser = main_module.get_parser()
    last = error_line(capsys, main_module.load_config, parser, [str(TINY_CONFIG), str(DATA_CONFIG)], [override])
    assert words in last, last


def test_a_key_main_py_does_not_read_names_the_file_that_sets_it(main_module, capsys, tmp_path):
    """A run saved by an older main.py may hold such a key in its configs/*-project.yaml: the error
    names that file, which --resume read, not the user's overrides."""
    saved = tmp_path / "2026-12-01T00-00-00-project.yaml"
    saved.write_text("model:\n  base_learing_rate: 1.0e-4\n")
    last = error_line(capsys, main_module.load_config, main_module.get_parser(),
                      [str(TINY_CONFIG), str(DATA_CONFIG), str(saved)], [])
    assert f"{saved} sets model.base_learing_rate, which main.py does not read" in last, last


class RecordIds(Txt2ImgIterableBaseDataset):
    """An iterable text-to-image dataset that yields the ids of the records it is given."""
    def __iter__(self):
        yield from self.sample_ids


@pytest.mark.parametrize("valid_ids", [None, list(range(5))])
def test_loader_workers_share_every_record_of_an_iterable_dataset(main_module, valid_ids):
    """main.worker_init_fn gave each worker num_records // num_workers records (the rest none), and
    failed on the base class's default valid_ids (None)."""
    loader = torch.utils.data.DataLoader(RecordIds(num_records=5, valid_ids=valid_ids), batch_size=None, num_workers=2,
                                         worker_init_fn=main_module.worker_init_fn)
    assert sorted(int(i) for i in loader) == [0, 1, 2, 3, 4]


TRAIN_TINY = [*SCENE_KEYS,
              "lightning.modelcheckpoint.params.monitor=null", "lightning.modelcheckpoint.params.save_top_k=0"]
ON_CPU = ["-t", "--no-test", "--accelerator", "cpu", "--devices", "1"]


def test_a_moved_run_resumes_from_inside_its_folder_into_its_one_last_ckpt(tmp_path):
    """Runs come back copied from GPU machines. Resumed in the copy, Lightning did not know the
    folder (its ModelCheckpoint restores only the folder it saved into) and wrote its step
    checkpoints to last-v1.ckpt beside the old last.ckpt, which the next --resume read; and a
    relative checkpoint path from inside the run folder made the run's folder ''."""
    from ldm.checkpoints import read_checkpoint
    periodic = "lightning.modelcheckpoint.params.every_n_train_steps=2"
    result = run_main("--base", TINY_CONFIG, DATA_CONFIG, *ON_CPU, "--max_steps", "3", "--logdir", tmp_path / "logs",
                      *TRAIN_TINY, periodic, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "logs").iterdir()
    moved = tmp_path / "back-from-the-gpu" / run.name
    shutil.copytree(run, moved)
    result = subprocess.run([sys.executable, REPO / "main.py", "--resume", "checkpoints/last.ckpt", *ON_CPU,
                             "--max_steps", "5"], cwd=moved, env=dict(os.environ, HF_HUB_OFFLINE="1"), input="",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["last.ckpt"]
    assert read_checkpoint(moved / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 3  # the original is left as it was

    # resumed again without --max_steps: the saved lightning config's 5 is reached, nothing would train
    configs = sorted(p.name for p in (moved / "configs").iterdir())
    assert_one_error_line(run_main("--resume", moved, "-t", "--accelerator", "cpu"),
                          f"--resume {moved}: it is at step 5 and max_steps is 5, so no step would be trained; "
                          "pass --max_steps N above 5 to train on")
    assert sorted(p.name for p in (moved / "configs").iterdir()) == configs


def test_sigterm_saves_the_step_it_arrives_in_and_exits_143(tmp_path):
    """kill, timeout (scripts/gpu_train_embedded.sh's backstop) and schedulers stop a job with
    SIGTERM: Lightning ends the step and exits 0, and main.py saved nothing."""
    from ldm.checkpoints import read_checkpoint
    process = subprocess.Popen(
        [sys.executable, "main.py", "--base", str(TINY_CONFIG), str(DATA_CONFIG), *ON_CPU, "--max_steps", "1000",
         "--logdir", str(tmp_path), *TRAIN_TINY, "lightning.modelcheckpoint.params.every_n_train_steps=1",
         "lightning.callbacks.image_logger.params.batch_frequency=1000"],
        cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not any(tmp_path.glob("*/checkpoints/last.ckpt")):  # a step trained
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGTERM at step" in err.strip().splitlines()[-1], err[-3000:]
    (run,) = tmp_path.iterdir()
    saved = [int(line.rsplit(" ", 1)[-1].rstrip(".")) for line in err.splitlines() if "last.ckpt at step" in line]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == saved[-1] < 1000
    assert f"stopped by SIGTERM at step {saved[-1]}: saved; --resume {run} continues it" in err


@pytest.mark.parametrize("done, trained, has_last, exits, says", [
    (True, True, True, False, "SIGTERM arrived as the training ended at step 7: the run is complete"),
    (False, True, True, True, "stopped by SIGTERM at step 7: saved; --resume {run} continues it"),
    (False, False, True, True, "no step trained by this command; --resume {run} continues from its last.ckpt"),
    (False, False, False, True, "stopped by SIGTERM at step 7: no step trained, nothing saved"),
])
def test_what_a_sigterm_left_is_said_as_it_is(main_module, tmp_path, caplog, done, trained, has_last, exits, says):
    """Lightning raises its SIGTERMException at the end of the epoch even when the last step is
    done, and before the first step too: neither may say "--resume continues it" untruthfully."""
    trainer, start = StandInTrainer(), main_module.TrainingStart(str(tmp_path / "checkpoints"))
    trainer.global_step = 7
    trainer.fit_loop = types.SimpleNamespace(done=done)
    start.step = 6 if trained else 7
    if has_last:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "last.ckpt").touch()
    assert main_module.stopped_by_sigterm(trainer, start, str(tmp_path)) == exits
    assert says.format(run=tmp_path) in caplog.text


def test_upstreams_run_and_trainer_mistakes_are_one_error_line_and_write_nothing(tmp_path):
    """Each was a traceback, a silent no-op or a wrong hint (a run folder written before some)."""
    logs = tmp_path / "logs"
    run = logs / "2026-12-07T10-00-00_tiny"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "project.yaml").write_text(TINY_CONFIG.read_text())
    (run / "checkpoints" / "trainstep_checkpoints").mkdir(parents=True)
    every_n = run / "checkpoints" / "trainstep_checkpoints" / "epoch=000000-step=000000003.ckpt"
    every_n.write_bytes(b"PK\x03\x04 not read")
    new_run = ["--base", TINY_CONFIG, DATA_CONFIG, *ON_CPU, "--max_steps", "2", "--logdir", tmp_path / "new",
               *SCENE_KEYS]
    weights = tmp_path / "export.ckpt"  # a checkpoint of weights alone: Lightning's KeyError, a run folder written
    torch.save({"state_dict": {}, "global_step": 3}, weights)
    for args, words in [
        (["--resume", logs, "-t"], [f"--resume {logs}: a folder of runs, not a run; pass one of them, e.g. {run}"]),
        (["--resume", run, "-t", "--logdir", tmp_path / "other"], ["-l/--logdir names a new run's folder",
                                                                     "--resume_from_checkpoint CKPT"]),
        (["--resume", run, "-t", "-f", "_x"], ["-f/--postfix names a new run's folder"]),
        (["--resume", every_n, "-t"], ["holds the weights alone", f"model.params.ckpt_path={every_n}"]),
        ([*new_run, "--num_nodes", "1"], ["unknown option --num_nodes: pass it as a config override, "
                                          "lightning.trainer.num_nodes=VALUE"]),
        ([*new_run, "--gradient_clip_val=1.0"], ["lightning.trainer.gradient_clip_val=VALUE"]),
        ([*new_run, "data.params.batch_size=four"], ["data.params.batch_size must be a whole number of at least 1, "
                                                     "got 'four'"]),
        ([*new_run, "data.params.batch_size=0"], ["data.params.batch_size", "got 0"]),
        ([*new_run, "data.params.num_workers=-1"], ["data.params.num_workers must be a whole number of at least 0"]),
        ([*new_run, "lightning.trainer.max_time=abc"], ["lightning.trainer: ", "abc"]),
        ([*new_run, "lightning.trainer.max_epochs=abc"], ["lightning.trainer: max_epochs='abc' (takes int or None)"]),
        ([*new_run, "--strategy", "ddp_spawn"], ["--strategy ddp_spawn: main.py saves last.ckpt from its own "
                                                 "process", "use --strategy ddp"]),
        ([*new_run, "--strategy", "ddp_fork"], ["--strategy ddp_fork: main.py saves last.ckpt from its own"]),
        ([*new_run, "--resume_from_checkpoint", weights], [f"{weights}: it holds the weights alone, no optimizer "
                                                          f"state to resume", f"model.params.ckpt_path={weights}"]),
        ([*new_run, "--logger", "False"], ["unknown option --logger: main.py builds the trainer's logger from the "
                                           "config's lightning.logger section"]),
    ]:
        assert_one_error_line(run_main(*args), *words)
    assert not (tmp_path / "new").exists() and not (tmp_path / "other").exists()
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*")) == sorted(
        str(p.relative_to(logs)) for p in (run, run / "configs", run / "configs" / "project.yaml",
                                           run / "checkpoints", every_n.parent, every_n))
