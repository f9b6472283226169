"""ldm/lr_scheduler.py: the warm-up + cosine schedule of the embedded configs, and what happens
when a run trains past its schedule's end."""
import pytest

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler2


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
    assert s(100) == pytest.approx(0.0)      # the end of the first cycle
    assert s(101) == pytest.approx(0.5, abs=1e-3)  # the start of the second
    assert s(200) == pytest.approx(0.0)
