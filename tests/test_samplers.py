import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver.sampler import DPMSolverSampler
from ldm.models.diffusion.guidance import guided_eps
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampler import SamplingOptions

SAMPLERS = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm": DPMSolverSampler}


@pytest.fixture(scope="module")
def conds(tiny_model):
    with torch.no_grad():
        return (tiny_model.get_learned_conditioning(["a wooden chair", "a red table"]),
                tiny_model.get_learned_conditioning(["", ""]))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [3, 5])
def test_sampler_end_to_end_on_tiny_model(tiny_model, conds, name, steps):
    c, uc = conds
    torch.manual_seed(0)
    latents, _ = SAMPLERS[name](tiny_model).sample(
        S=steps, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
        unconditional_guidance_scale=7.5, unconditional_conditioning=uc, eta=0.0)
    assert latents.shape == (2, 4, 8, 8)
    assert latents.device.type == "cpu"
    images = tiny_model.decode_first_stage(latents)
    assert images.shape == (2, 3, 64, 64)
    assert torch.isfinite(images).all()


def test_ddim_stochastic_encode_decode_on_cpu(tiny_model, conds):
    c, uc = conds
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ddim_num_steps=5, ddim_eta=0.0, verbose=False)
    x0 = torch.randn(2, 4, 8, 8)
    z = sampler.stochastic_encode(x0, torch.tensor([3, 3]))
    out = sampler.decode(z, c, 3, unconditional_guidance_scale=5.0, unconditional_conditioning=uc, verbose=False)
    assert out.shape == x0.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_decode_keeps_the_known_part_as_sampling_does(tiny_model_with_weights, sampler_class):
    """img2img's decode over the whole schedule is sampling from the same start, and its
    `mask`/`x0` replacement (--reference-image in img2img) is sampling's, step for step. PLMS's
    decode steps as PLMS samples (it stepped as DDIM while decode had a loop of its own)."""
    model = tiny_model_with_weights
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    known = {"mask": torch.tensor([1., 0., 0.])[:, None, None, None],
             "x0": torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)}
    sampler = sampler_class(model)
    with torch.no_grad():
        c, uc = (model.get_learned_conditioning(p) for p in (["a wooden chair", "a red table", "a chair"], [""] * 3))
        results = []
        for options in ({}, known):
            torch.manual_seed(2)
            sampled, _ = sampler.sample(S=4, batch_size=3, shape=[4, 8, 8], conditioning=c, x_T=x_T, verbose=False,
                                        unconditional_guidance_scale=5.0, unconditional_conditioning=uc, **options)
            torch.manual_seed(2)
            decoded = sampler.decode(x_T, c, 4, unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                                     verbose=False, **options)
            assert torch.equal(decoded, sampled)
            results.append(decoded)
    # only the known image is replaced; without shared attention the others never see it
    assert not torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1:], results[1][1:])


@pytest.mark.parametrize("method", ["sample", "decode"])
def test_a_known_image_leaves_the_other_images_step_noise_as_it_was(tiny_model_with_weights, method, monkeypatch):
    """At eta 1, a batch with a known image in front (a --reference-image anchor, replaced by the
    reference noised to each step) draws for its other images exactly the step noise of the batch
    without it, the same seed: the known image draws none, nor the global noise that keeps it known."""
    model, sampler = tiny_model_with_weights, DDIMSampler(tiny_model_with_weights)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    known = {"mask": torch.tensor([1., 0., 0.])[:, None, None, None],
             "x0": torch.randn(1, 4, 8, 8).expand(3, -1, -1, -1)}
    drawn = []

    def recorded_step_noise(*args):
        drawn.append(DDIMSampler.step_noise(sampler, *args))
        return drawn[-1]
    monkeypatch.setattr(sampler, "step_noise", recorded_step_noise)

    def run(prompts, x, seed=2, **options):
        drawn.clear()
        c, uc = (model.get_learned_conditioning(p) for p in (prompts, [""] * len(prompts)))
        torch.manual_seed(seed)
        guidance = {"unconditional_guidance_scale": 5.0, "unconditional_conditioning": uc, "verbose": False}
        if method == "sample":
            images = sampler.sample(S=4, batch_size=len(x), shape=[4, 8, 8], conditioning=c, x_T=x, eta=1.0,
                                    **guidance, **options)[0]
        else:
            sampler.make_schedule(4, ddim_eta=1.0, verbose=False)
            images = sampler.decode(x, c, 4, **guidance, **options)
        return images, list(drawn)

    with torch.no_grad():
        plain, plain_noise = run(["a wooden chair", "a red table"], x_T)
        with_known, known_noise = run(["a wooden chair"] * 2 + ["a red table"], torch.cat([0 * x_T[:1], x_T]), **known)
        other_seed, _ = run(["a wooden chair", "a red table"], x_T, seed=3)
    assert len(plain_noise) == 4 and all(torch.equal(a, b) for a, b in zip(plain_noise, known_noise, strict=True))
    # batches of 2 and 3 images round differently on the CPU (by 4e-5 at eta 0); other noise moves them by ~1
    torch.testing.assert_close(with_known[1:], plain, rtol=0, atol=1e-3)
    assert (other_seed - plain).abs().max() > 0.1


def test_dpm_solver_shows_the_model_the_known_part_at_each_calls_noise_level(tiny_model_with_weights, monkeypatch):
    """DDIM's mask/x0 replacement, made on DPM-Solver's model input: the known image is x0 noised
    to the call's level (alpha_t x0 + sigma_t noise), the others are the solver's own."""
    model = tiny_model_with_weights
    x_T = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = torch.full((3, 4, 8, 8), 50.0)  # far from the noise: the known image is recognisable at every level
    mask = torch.tensor([1., 0., 0.])[:, None, None, None]
    seen, real = [], DPMSolverSampler.noise_estimate

    def spy(self, x, t, *args, **kwargs):
        seen.append((x.clone(), t.clone()))
        return real(self, x, t, *args, **kwargs)

    monkeypatch.setattr(DPMSolverSampler, "noise_estimate", spy)
    with torch.no_grad():
        c, uc = (model.get_learned_conditioning(p) for p in (["a wooden chair", "a red table", "a chair"], [""] * 3))
        run = lambda **known: DPMSolverSampler(model).sample(
            S=4, batch_size=3, shape=[4, 8, 8], conditioning=c, x_T=x_T, verbose=False,
            unconditional_guidance_scale=5.0, unconditional_conditioning=uc, **known)[0]
        plain, known = run(), run(mask=mask, x0=x0)
    calls = seen[len(seen) // 2:]
    abar = model.alphas_cumprod
    for x, t in calls:
        a = abar[int(t[0].round())]  # the discrete model's level at that call (to within a timestep)
        noise = (x[0] - a.sqrt() * x0[0]) / (1 - a).sqrt()
        assert noise.abs().max() < 6 and abs(noise.std().item() - 1) < 0.3, float(t[0])
    assert torch.equal(calls[0][0][1:], x_T[1:])  # the first call: the start noise of the others
    # without shared attention nothing else depends on the known image
    assert not torch.equal(known[0], plain[0]) and torch.equal(known[1:], plain[1:])


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_update_clips_x0_only_for_pixel_space_models(tiny_model, clip, monkeypatch):
    assert not tiny_model.clip_denoised  # a latent model: its x0 is unbounded
    monkeypatch.setattr(tiny_model, "clip_denoised", clip)
    sampler = DDIMSampler(tiny_model)
    sampler.make_schedule(ddim_num_steps=5, ddim_eta=0.0, verbose=False)
    index = 2
    a_t, a_prev = sampler.ddim_alphas[index], sampler.ddim_alphas_prev[index]
    torch.manual_seed(0)
    x, e_t = torch.randn(2, 4, 8, 8), 3 * torch.randn(2, 4, 8, 8)
    raw_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
    assert raw_x0.abs().max() > 1
    x_prev, pred_x0 = sampler.ddim_update(x, e_t, index)
    expected_x0 = raw_x0.clamp(-1, 1) if clip else raw_x0
    torch.testing.assert_close(pred_x0, expected_x0)
    # eta 0: x_{t-1} stays on the DDIM line through x_t and the (clipped) x0
    noise = (x - a_t.sqrt() * expected_x0) / (1 - a_t).sqrt()
    torch.testing.assert_close(x_prev, a_prev.sqrt() * expected_x0 + (1 - a_prev).sqrt() * noise)


def test_clipped_dpm_solver_clips_the_data_prediction(tiny_model):
    from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP
    from ldm.models.diffusion.dpm_solver.sampler import ClippedDPMSolver
    schedule = NoiseScheduleVP(tiny_model.alphas_cumprod)
    noise_fn = lambda x, t: -5 * x  # drives x0 far outside [-1, 1]
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.5)
    raw = DPM_Solver(noise_fn, schedule).data_prediction_fn(x, t)
    clipped = ClippedDPMSolver(noise_fn, schedule).data_prediction_fn(x, t)
    assert raw.abs().max() > 1
    assert torch.equal(clipped, raw.clamp(-1, 1))


def linear_lambda_schedule(n=1000):
    """alphas_cumprod whose half log-SNR lambda falls linearly in DPM-Solver's time, from 3 at
    t = 1/n to -3 at t = 1: its time-uniform steps are then uniform in lambda."""
    from ldm.models.diffusion.dpm_solver.dpm_solver import NoiseScheduleVP
    t = torch.arange(1, n + 1) / n
    return NoiseScheduleVP(torch.sigmoid(2 * (3 - 6 * (t - 1 / n) / (1 - 1 / n))))


@pytest.mark.parametrize("slope", [0.0, 1.0])
def test_dpm_solver_is_exact_for_constant_x0_and_second_order_beyond(slope):
    """A model whose x0 prediction is a + slope * lambda (whatever x): the diffusion ODE then has
    the closed-form solution x_e = sigma_e / sigma_T x_T + sigma_e [e^l (a + slope (l - 1))] from
    lambda_T to lambda_e. DPM-Solver++ solves it exactly for a constant x0 (DDIM's assumption), and
    for a sloped one its error falls 4x per halved step: second order. A first-order method, or a
    wrong multistep coefficient, falls 2x."""
    from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver
    schedule = linear_lambda_schedule()
    a, b = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    per_image = lambda v: v.reshape(-1, 1, 1, 1)
    x0 = lambda lam: a + slope * b * per_image(lam)
    noise = lambda x, t: ((x - per_image(schedule.marginal_alpha(t)) * x0(schedule.marginal_lambda(t)))
                          / per_image(schedule.marginal_std(t)))
    primitive = lambda lam: torch.exp(lam) * (a + slope * b * (lam - 1))
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    t_T, t_e = torch.ones(1), torch.full((1,), 1 / 1000)
    sigma_T, sigma_e = schedule.marginal_std(t_T), schedule.marginal_std(t_e)
    exact = sigma_e / sigma_T * x_T + sigma_e * (primitive(schedule.marginal_lambda(t_e))
                                                 - primitive(schedule.marginal_lambda(t_T)))
    errors = [(DPM_Solver(noise, schedule).sample(x_T, steps) - exact).abs().max().item() for steps in (16, 32, 64)]
    if slope == 0:
        assert max(errors) < 1e-5, errors
    else:
        assert errors[2] > 1e-4, errors  # measurable above float32 rounding
        assert all(3.6 < coarse / fine < 4.4 for coarse, fine in zip(errors, errors[1:])), errors


def test_dpm_solver_calls_the_model_at_its_own_timesteps():
    """Continuous time t = (n + 1) / N is timestep n of a schedule of N, whatever N (the authors'
    wrapper scaled by 1000, right only for N = 1000)."""
    for n in (1000, 100):
        schedule = linear_lambda_schedule(n)
        assert torch.allclose(schedule.model_time(schedule.t_array[0]), torch.arange(n, dtype=torch.float32), atol=1e-3)


@pytest.mark.parametrize("clip", [False, True])
def test_dpm_sampler_clips_x0_only_for_pixel_space_models(tiny_model, conds, clip, monkeypatch):
    from ldm.models.diffusion.dpm_solver.sampler import ClippedDPMSolver
    monkeypatch.setattr(tiny_model, "clip_denoised", clip)
    predictions = []
    original = ClippedDPMSolver.data_prediction_fn
    monkeypatch.setattr(ClippedDPMSolver, "data_prediction_fn",
                        lambda self, x, t: predictions.append(original(self, x, t)) or predictions[-1])
    c, uc = conds
    DPMSolverSampler(tiny_model).sample(S=3, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                        unconditional_guidance_scale=7.5, unconditional_conditioning=uc)
    assert len(predictions) == (3 if clip else 0)
    assert all(p.abs().max() <= 1 for p in predictions)


def test_guided_eps_scale_one_is_plain_cond_call(tiny_model_with_weights):
    model = tiny_model_with_weights  # the zero-output tiny model would make every call equal
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        c, uc = (model.get_learned_conditioning(p) for p in (["a wooden chair", "a red table"], ["", ""]))
        expected = model.apply_model(x, t, c)
        assert expected.abs().max() > 0 and not torch.equal(model.apply_model(x, t, uc), expected)
        assert torch.equal(guided_eps(model, x, t, c, uc, 1.0), expected)
        assert torch.equal(guided_eps(model, x, t, c, None, 7.5), expected)


class SpyModel:
    """Records apply_model calls; eps = x * 0 + (value identifying uncond/cond)."""

    def __init__(self):
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((x, t, cond))
        return cond[:, :1, :1, None].expand(-1, *x.shape[1:]).clone()


def test_guided_eps_single_batched_call_uncond_first():
    model = SpyModel()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([7, 8, 9])
    cond, uncond = torch.full((3, 5, 6), 2.0), torch.full((3, 5, 6), 1.0)
    eps = guided_eps(model, x, t, cond, uncond, 3.0)
    assert len(model.calls) == 1
    x_in, t_in, c_in = model.calls[0]
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    assert torch.equal(c_in[:3], uncond) and torch.equal(c_in[3:], cond)
    # e_u + s * (e_c - e_u) = 1 + 3 * (2 - 1)
    assert torch.equal(eps, torch.full_like(x, 4.0))


def test_guided_eps_dict_conditioning():
    seen = []

    class DictModel:
        def apply_model(self, x, t, cond):
            seen.append(cond)
            return cond["c_crossattn"][0][:, :1, :1, None].expand(-1, *x.shape[1:]).clone()

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    cond = {"c_concat": [torch.ones(2, 4, 8, 8)], "c_crossattn": [torch.full((2, 5, 6), 2.0)]}
    uncond = {"c_concat": [torch.ones(2, 4, 8, 8)], "c_crossattn": [torch.full((2, 5, 6), 1.0)]}
    eps = guided_eps(DictModel(), x, t, cond, uncond, 2.0)
    assert seen[0]["c_concat"][0].shape[0] == 4 and torch.equal(seen[0]["c_crossattn"][0][:2], uncond["c_crossattn"][0])
    assert torch.equal(eps, torch.full_like(x, 3.0))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_route_guidance_through_guided_eps(tiny_model, conds, name, monkeypatch):
    c, uc = conds
    calls = []
    real = tiny_model.apply_model

    def spy(x, t, cond, *a, **k):
        calls.append(x.shape[0])
        return real(x, t, cond, *a, **k)

    monkeypatch.setattr(tiny_model, "apply_model", spy)
    SAMPLERS[name](tiny_model).sample(S=3, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                      unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
    assert calls and all(n == 4 for n in calls)  # every call: one batch of uncond + cond halves


def test_a_misspelt_option_is_an_error_not_ignored(tiny_model, conds):
    # upstream's sample(**kwargs) swallowed e.g. quantize_denoised= (the option is quantize_x0)
    c, uc = conds
    for sampler in SAMPLERS.values():
        with pytest.raises(TypeError, match="quantize_denoised"):
            sampler(tiny_model).sample(S=2, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                       quantize_denoised=True)


@pytest.mark.parametrize("name,options,message", [
    ("plms", dict(eta=0.5), "deterministic: eta must be 0"),
    ("dpm", dict(eta=0.5), "deterministic: eta must be 0"),
    ("dpm", dict(S=1), "takes 2 to 999 steps"),
    # the model's 1000 training timesteps bound every sampler (DDIM's would index past them;
    # DPM-Solver ran 5000 steps on a 1000-step model)
    ("ddim", dict(S=1000), "takes 1 to 999 steps"),
    ("dpm", dict(S=5000), "takes 2 to 999 steps"),
    ("dpm", dict(temperature=0.5), "does not support temperature"),
    # an option whose default is None is set when it is not None, whatever its == says
    ("dpm", dict(callback=lambda i: None, img_callback=np.array([1, 2])), "does not support callback, img_callback"),
    ("ddim", dict(eta=1.5), r"eta must be in \[0, 1\], got 1.5"),  # had sampled NaN images
    ("ddim", dict(eta=float("nan")), r"eta must be in \[0, 1\], got nan"),
])
def test_what_a_sampler_cannot_do_is_refused(tiny_model, conds, name, options, message):
    c, _ = conds
    options = {"S": 3, **options}
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](tiny_model).sample(batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False, **options)


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("options,message", [
    (dict(normals_sequence=torch.zeros(2)), "normals_sequence is not used by any sampler"),
    (dict(corrector_kwargs={"weight": 2}), "corrector_kwargs are the score_corrector's arguments"),
])
def test_an_option_no_sampler_would_read_is_refused(tiny_model, conds, name, options, message):
    # upstream took both and sampled as if they were not there
    c, _ = conds
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](tiny_model).sample(S=3, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                          **options)


@pytest.mark.parametrize("name", ["ddim", "plms"])  # DPM-Solver refuses score correctors
def test_a_score_corrector_needs_no_keyword_arguments(tiny_model, conds, name):
    """corrector_kwargs defaults to None: upstream unpacked it as **None, a TypeError."""
    c, _ = conds
    seen = []

    class Halve:
        def modify_score(self, model, e_t, x, t, c):
            seen.append(float(t[0]))
            return e_t / 2

    SAMPLERS[name](tiny_model).sample(S=3, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                      score_corrector=Halve())
    assert seen


def test_plms_schedule_refuses_eta(tiny_model):
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(tiny_model).make_schedule(ddim_num_steps=3, ddim_eta=0.5, verbose=False)


def written_out_ddim(model, x, c, uc, scale, steps, plms=False, eta=0.0, noises=()):
    """DDIM (Song et al. eq. 12, with eta > 0 the step noise of eq. 16, `noises` one per step) and
    PLMS (Liu et al. Alg. 2) from the papers' formulas, independent of the sampler classes: the
    parity reference for both."""
    import numpy as np
    abar = model.alphas_cumprod
    timesteps = [int(t) for t in np.arange(steps) * model.num_timesteps // steps + 1][::-1]  # descending
    eps = lambda x, t: guided_eps(model, x, torch.full((x.shape[0],), t), c, uc, scale)

    def ddim_step(x, e, t, t_prev, noise=None):
        a, a_prev = abar[t], abar[t_prev] if t_prev is not None else abar[0]
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        if noise is None:
            return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        return a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).sqrt() * e + sigma * noise

    history, noises = [], iter(noises)
    for t, t_prev in zip(timesteps, timesteps[1:] + [None], strict=True):
        e = eps(x, t)
        if not plms:
            e_step = e
        elif not history:  # pseudo improved Euler: the mean of the slopes at both ends
            e_step = (e + eps(ddim_step(x, e, t, t_prev), t_prev if t_prev is not None else t)) / 2
        else:  # Adams-Bashforth of order 2, 3, 4 on the earlier estimates
            weights = {1: (3, -1, 2), 2: (23, -16, 5, 12), 3: (55, -59, 37, -9, 24)}[len(history)]
            e_step = sum(w * h for w, h in zip(weights[:-1], [e, *history[::-1]], strict=True)) / weights[-1]
        history = (history + [e])[-3:]
        x = ddim_step(x, e_step, t, t_prev, next(noises, None))
    return x


@pytest.mark.parametrize("name", ["ddim", "plms"])
def test_ddim_and_plms_match_the_written_out_formulas(tiny_model_with_weights, name):
    tiny_model = tiny_model_with_weights  # no zero-initialised output layer: the noise estimates are not 0
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        c, uc = (tiny_model.get_learned_conditioning(p) for p in (["a wooden chair", "a red table"], ["", ""]))
        out, _ = SAMPLERS[name](tiny_model).sample(S=6, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                                   x_T=x_T, unconditional_guidance_scale=5.0,
                                                   unconditional_conditioning=uc)
        expected = written_out_ddim(tiny_model, x_T, c, uc, 5.0, steps=6, plms=name == "plms")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if name == "plms":  # six steps use every order, and PLMS is not DDIM
        assert not torch.allclose(out, written_out_ddim(tiny_model, x_T, c, uc, 5.0, steps=6), atol=1e-4)


def test_ddim_with_eta_matches_the_written_out_formula(tiny_model_with_weights):
    """eta 1: the step noise, scaled by sigma_t of Song et al. eq. 16, and the direction to x_t
    shortened to make room for it."""
    model = tiny_model_with_weights
    g = torch.Generator().manual_seed(2)
    x_T, noises = torch.randn(2, 4, 8, 8, generator=g), [torch.randn(2, 4, 8, 8, generator=g) for _ in range(6)]
    sampler = DDIMSampler(model)
    drawn = iter(noises)
    sampler.step_noise = lambda shape, device, index: next(drawn)
    with torch.no_grad():
        c, uc = (model.get_learned_conditioning(p) for p in (["a wooden chair", "a red table"], ["", ""]))
        out, _ = sampler.sample(S=6, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False, x_T=x_T, eta=1.0,
                                unconditional_guidance_scale=5.0, unconditional_conditioning=uc)
        expected = written_out_ddim(model, x_T, c, uc, 5.0, steps=6, eta=1.0, noises=noises)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, written_out_ddim(model, x_T, c, uc, 5.0, steps=6), atol=1e-2)


def test_dpm_solver_is_the_solver_on_the_guided_noise_estimate_of_the_other_samplers(tiny_model_with_weights):
    """The sampler wraps the solver around guided_eps at the model's own timesteps: nothing else
    (a doubled scale there had passed every test)."""
    from ldm.models.diffusion.dpm_solver.dpm_solver import DPM_Solver, NoiseScheduleVP
    model = tiny_model_with_weights
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        c, uc = (model.get_learned_conditioning(p) for p in (["a wooden chair", "a red table"], ["", ""]))
        out, _ = DPMSolverSampler(model).sample(S=5, batch_size=2, shape=[4, 8, 8], conditioning=c, verbose=False,
                                                x_T=x_T, unconditional_guidance_scale=5.0,
                                                unconditional_conditioning=uc)
        ns = NoiseScheduleVP(model.alphas_cumprod.float())
        expected = DPM_Solver(lambda x, t: guided_eps(model, x, ns.model_time(t), c, uc, 5.0), ns).sample(x_T, steps=5)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("name, steps", [("ddim", 4), ("plms", 4), ("dpm", 5)])
def test_model_timesteps_are_the_timesteps_sampling_calls_the_unet_at(tiny_model, conds, name, steps):
    """The dry run a step window is checked against: no model call, no random number drawn."""
    sampler = SAMPLERS[name](tiny_model)
    state = torch.get_rng_state()
    dry = sampler.model_timesteps(steps)
    assert torch.equal(torch.get_rng_state(), state)
    seen = []
    unet = tiny_model.model.diffusion_model
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(float(args[1][0])))
    try:
        sampler.sample(steps, 1, [4, 8, 8], conditioning=conds[0][:1], verbose=False)
    finally:
        hook.remove()
    assert dry == seen and len(seen) == {"ddim": steps, "plms": steps + 1, "dpm": steps}[name]


@pytest.mark.parametrize("loop", ["p_sample_loop", "progressive_denoising"])
def test_ancestral_sampling_ends_on_x0_where_it_is_known(tiny_model, conds, loop):
    """After the step from t to t - 1 the known part is x0 at level t - 1, and x0 itself after the
    last: upstream noised it to t, so the known part of its final sample kept noise of std
    sqrt(1 - alpha_bar_0)."""
    c, _ = conds
    torch.manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1
    steps = dict(timesteps=3) if loop == "p_sample_loop" else dict(start_T=3)
    out = getattr(tiny_model, loop)(c, (2, 4, 8, 8), mask=mask, x0=x0, verbose=False, **steps)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.equal(out[..., :4], x0[..., :4]) and not torch.equal(out[..., 4:], x0[..., 4:])


def test_the_logged_outpainting_keeps_the_centre_the_inpainting_fills(tiny_model, monkeypatch):
    masks = []

    def sample_log(**options):
        if options.get("mask") is not None:
            masks.append(options["mask"])
        return torch.zeros(options["batch_size"], 4, 8, 8), None

    monkeypatch.setattr(tiny_model, "sample_log", sample_log)
    batch = {tiny_model.first_stage_key: torch.rand(2, 64, 64, 3) * 2 - 1, tiny_model.cond_stage_key: ["a", "b"]}
    tiny_model.log_images(batch, N=2, inpaint=True, plot_progressive_rows=False, plot_diffusion_rows=False)
    inpaint, outpaint = masks  # mask 1: kept
    assert inpaint[0, 0, 4, 4] == 0 and inpaint[0, 0, 0, 0] == 1 and torch.equal(outpaint, 1 - inpaint)


def x0_model():
    from omegaconf import OmegaConf
    from conftest import TINY_CONFIG
    from ldm.util import instantiate_from_config
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.update(parameterization="x0", timesteps=10)
    torch.manual_seed(0)
    return instantiate_from_config(config.model).eval()


@pytest.mark.parametrize("sampler", [DDIMSampler, PLMSSampler, DPMSolverSampler])
def test_an_x0_model_is_refused_by_the_fast_samplers(sampler):
    """They read the model's output as noise: upstream sampled noise from an x0 model."""
    from ldm.util import ModelError
    with pytest.raises(ModelError, match=f"{sampler.__name__} sample noise-predicting models .parameterization: "
                                         "eps.; this one predicts x0: sample it with its full chain"):
        sampler(x0_model())


def test_an_x0_models_training_images_come_from_its_full_chain():
    model = x0_model()
    batch = {"jpg": torch.rand(1, 64, 64, 3) * 2 - 1, "txt": ["a chair"]}
    with torch.no_grad():
        log = model.log_images(batch, N=1, ddim_steps=5, plot_progressive_rows=False, plot_diffusion_rows=False,
                               inpaint=False, quantize_denoised=False)
    assert log["samples"].shape == (1, 3, 64, 64) and torch.isfinite(log["samples"]).all()


def test_txt2img_refuses_an_x0_model_in_one_line(tmp_path):
    from omegaconf import OmegaConf
    from conftest import TINY_CONFIG
    from test_cli import assert_one_line_error, run
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.parameterization = "x0"
    OmegaConf.save(config, tmp_path / "x0.yaml")
    result = run("txt2img.py", "--config", tmp_path / "x0.yaml", "--random-weights", "--H", "64", "--W", "64",
                 "--n_samples", "1", "--n_iter", "1", "--outdir", tmp_path / "out")
    assert_one_line_error(result, "this one predicts x0: sample it with its full chain")
    assert "model on cpu" not in result.stderr  # refused from the config, before the model is built


def test_log_images_plots_the_denoising_rows_with_ddim(tiny_model):
    """With DDIM, upstream iterated over the keys of its intermediates dict: an AttributeError at
    the first image log of a config that sets plot_denoise_rows."""
    batch = {"jpg": torch.rand(1, 64, 64, 3) * 2 - 1, "txt": ["a chair"]}
    with torch.no_grad():
        log = tiny_model.log_images(batch, N=1, ddim_steps=5, plot_denoise_rows=True, inpaint=False,
                                    plot_progressive_rows=False, plot_diffusion_rows=False, quantize_denoised=False)
    assert log["denoise_row"].shape[0] == 3 and torch.isfinite(log["denoise_row"]).all()


def test_sampling_options_refuse_to_check_an_option_they_do_not_have():
    # a misspelt name in a loop's refusal list would silently let that option through
    with pytest.raises(ValueError, match="no option 'temprature'"):
        SamplingOptions(temperature=0.5).changed("temperature", "temprature")
    options = SamplingOptions(temperature=0.5, mask=torch.ones(1))
    assert options.changed("temperature", "noise_dropout") == ["temperature"]
