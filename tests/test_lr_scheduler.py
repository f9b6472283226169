"""ldm/lr_scheduler.py: the warm-up + cosine schedule of the embedded configs, what happens
when a run trains past its schedule's end, and multipliers that checkpoints can hold."""
import pytest
from omegaconf import OmegaConf

from conftest import REPO
from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2
from ldm.util import instantiate_from_config


def cosine(cycle=100):
    return LambdaWarmUpCosineScheduler2(warm_up_steps=[10], f_min=[0.02], f_max=[1.0], f_start=[1e-6],
                                        cycle_lengths=[cycle])


def test_cosine_warms_up_then_decays_to_f_min_at_the_cycle_end():
    s = cosine()
    assert s(0) == pytest.approx(1e-6)
    assert s(5) == pytest.approx(0.5, abs=1e-5)
    assert s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.51)  # half-way through the decay: (1 + 0.02) / 2
    assert s(100) == pytest.approx(0.02)


@pytest.mark.parametrize("step", [101, 150, 10_000])
def test_steps_past_the_schedule_keep_its_end_value(step):
    # before: find_in_interval returned None past the last cycle and schedule() raised TypeError
    assert cosine()(step) == pytest.approx(0.02)
    linear = LambdaLinearScheduler(warm_up_steps=[10], f_min=[0.1], f_max=[1.0], f_start=[1e-6], cycle_lengths=[100])
    assert linear(step) == pytest.approx(0.1)  # not below f_min, never a negative learning rate


def test_two_cycles_restart_at_their_boundary():
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[0, 0], f_min=[0.0, 0.0], f_max=[1.0, 0.5], f_start=[1.0, 0.5],
                                     cycle_lengths=[100, 100])
    assert s(99) == pytest.approx(0.0, abs=1e-3)  # the last of the first cycle's 100 steps
    assert s(100) == 0.5  # the second starts at its f_max (upstream: step 100 was the first cycle's 101st)
    assert s(200) == pytest.approx(0.0)


@pytest.mark.parametrize("scheduler", [LambdaWarmUpCosineScheduler2, LambdaLinearScheduler])
def test_each_cycle_warms_up_from_f_start_at_its_first_step(scheduler):
    s = scheduler(warm_up_steps=[2, 2], f_min=[0.2, 0.2], f_max=[1.0, 1.0], f_start=[0.0, 0.0], cycle_lengths=[10, 10])
    assert [s(n) for n in (0, 1, 10, 11)] == [0.0, 0.5, 0.0, 0.5]  # upstream: 0.2 (the first cycle's end) at 10


def test_a_warm_up_as_long_as_the_schedule_leaves_no_decay():
    # upstream divided by zero at the step the warm-up ended
    s = LambdaWarmUpCosineScheduler2(warm_up_steps=[10], f_min=[0.1], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])
    assert s(10) == pytest.approx(0.1)
    single = LambdaWarmUpCosineScheduler(warm_up_steps=5, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=5)
    assert single(5) == pytest.approx(0.1)


@pytest.mark.parametrize("config", ["configs/embedded/procedural-t2i-16px.yaml", "configs/embedded/procedural-t2i.yaml",
                                    "configs/embedded/procedural-t2i-16px-cooldown.yaml",
                                    "configs/stable-diffusion/v1-inference.yaml",
                                    "configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml"])
def test_multipliers_are_python_floats_so_checkpoints_load_weights_only(config):
    # LambdaLR makes them the optimizer's lr, which every checkpoint pickles: a numpy scalar there
    # made torch.load(weights_only=True) refuse the file, and with it main.py --resume
    scheduler = instantiate_from_config(OmegaConf.load(REPO / config).model.params.scheduler_config)
    for step in (0, 1, 5, 150, 250, 10**6):
        assert type(scheduler.schedule(step)) is float, (config, step)


def test_the_cosine_schedules_are_python_floats_too():
    single = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=100)
    assert all(type(s.schedule(step)) is float for s in (single, cosine()) for step in (0, 5, 10, 50, 100, 500))


@pytest.mark.parametrize("scheduler", [LambdaWarmUpCosineScheduler2, LambdaLinearScheduler])
def test_a_schedule_takes_the_step_alone(scheduler):
    # LambdaLR passes the step only; upstream's **kwargs took any misspelt extra and ignored it
    s = scheduler(warm_up_steps=[2], f_min=[0.2], f_max=[1.0], f_start=[0.0], cycle_lengths=[10])
    with pytest.raises(TypeError, match="warmup"):
        s(5, warmup=1)
    single = LambdaWarmUpCosineScheduler(warm_up_steps=2, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=10)
    with pytest.raises(TypeError, match="warmup"):
        single(5, warmup=1)
