import numpy as np
import pytest

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps


def upstream_uniform(n, T=1000):
    return np.asarray(list(range(0, T, T // n))) + 1


@pytest.mark.parametrize("n", [1, 3, 9, 27, 50, 998, 999])
def test_uniform_gives_exactly_n_distinct_steps_in_range(n):
    steps = make_ddim_timesteps("uniform", n, 1000, verbose=False)
    assert len(steps) == n
    assert len(np.unique(steps)) == n
    assert np.all(np.diff(steps) > 0)
    assert steps.min() >= 1 and steps.max() <= 999
    # every step indexes the 1000-entry schedule (T steps would reach timestep 1000: IndexError)
    make_ddim_sampling_parameters(np.linspace(0.999, 0.001, 1000), steps, eta=1.0, verbose=False)


@pytest.mark.parametrize("n", [1, 10, 20, 50, 100, 250, 500])
def test_uniform_matches_upstream_for_divisors(n):
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", n, 1000, verbose=False), upstream_uniform(n))


def test_fifty_steps_exact_upstream_array():
    expected = np.arange(0, 1000, 20) + 1
    np.testing.assert_array_equal(make_ddim_timesteps("uniform", 50, 1000, verbose=False), expected)


@pytest.mark.parametrize("n", [0, -1, 1000, 1001])
def test_out_of_range_step_counts_raise(n):
    with pytest.raises(ValueError, match="between 1 and 999"):
        make_ddim_timesteps("uniform", n, 1000)


def test_checkpoint_passes_through_without_grad_and_matches_with_grad():
    import torch
    from ldm.modules.diffusionmodules.util import checkpoint

    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(checkpoint(lin, (x,), lin.parameters(), True), lin(x))
    checkpoint(lin, (x,), lin.parameters(), True).sum().backward()
    g_ckpt = (x.grad.clone(), lin.weight.grad.clone())
    x.grad = None
    lin.weight.grad = None
    lin(x).sum().backward()
    assert torch.allclose(g_ckpt[0], x.grad) and torch.allclose(g_ckpt[1], lin.weight.grad)
