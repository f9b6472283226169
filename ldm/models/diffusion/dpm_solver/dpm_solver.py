"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): the part of the authors' dpm_solver.py (github.com/LuChengTHU/dpm-solver,
MIT licence; vendored whole by upstream) that `--sampler dpm` runs, computed as it computed it.

DPMSolverSampler always asked that file for the same solver: a discrete-time noise schedule read
as continuous time, a noise-prediction model, the data-prediction (x_0) form, multistep order 2
on time-uniform steps, first order at the last step of short runs. Its other branches (singlestep,
third order, adaptive step size, dynamic thresholding, continuous schedules, x_0/v/score models,
classifier guidance) were unreachable here and are left out; the authors' repository has them.
"""
import torch


class NoiseScheduleVP:
    """A discrete-time DDPM schedule (alphas_cumprod of timesteps n = 0 .. N-1) as the VP SDE
    DPM-Solver integrates: timestep n sits at continuous time t = (n + 1) / N, between them
    log(alpha_t) is interpolated linearly; alpha_t = sqrt(alphas_cumprod), sigma_t = sqrt(1 - alpha_t²),
    and the solver steps in lambda_t = log(alpha_t / sigma_t), half the log-SNR."""

    def __init__(self, alphas_cumprod):
        log_alphas = 0.5 * torch.log(alphas_cumprod)
        self.total_N = len(log_alphas)
        self.T = 1.
        self.t_array = torch.linspace(0., 1., self.total_N + 1)[1:].reshape((1, -1))
        self.log_alpha_array = log_alphas.reshape((1, -1,))

    def marginal_log_mean_coeff(self, t):
        """log(alpha_t) at continuous times t in [1/N, 1]."""
        return interpolate_fn(t.reshape((-1, 1)), self.t_array.to(t.device),
                              self.log_alpha_array.to(t.device)).reshape((-1))

    def marginal_alpha(self, t):
        return torch.exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t):
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        log_mean_coeff = self.marginal_log_mean_coeff(t)
        log_std = 0.5 * torch.log(1. - torch.exp(2. * log_mean_coeff))
        return log_mean_coeff - log_std

    def model_time(self, t):
        """The model's timestep n (a float between the integers) at continuous time t = (n + 1) / N."""
        return (t - 1. / self.total_N) * self.total_N


class DPM_Solver:
    """DPM-Solver++(2M) for `model_fn(x, t) -> noise` at continuous times t (NoiseScheduleVP's).

    Each step solves the diffusion ODE written for the data prediction x_0 from lambda_s to
    lambda_t exactly, given x_0 along the way: first order takes x_0 as constant (DDIM), second
    order as linear in lambda, its slope from the previous step's x_0 (no extra model call)."""

    def __init__(self, model_fn, noise_schedule):
        self.model = model_fn
        self.noise_schedule = noise_schedule

    def data_prediction_fn(self, x, t):
        """x_0 = (x_t - sigma_t * noise) / alpha_t."""
        noise = self.model(x, t)
        dims = x.dim()
        alpha_t, sigma_t = self.noise_schedule.marginal_alpha(t), self.noise_schedule.marginal_std(t)
        return (x - expand_dims(sigma_t, dims) * noise) / expand_dims(alpha_t, dims)

    def first_order_update(self, x, s, t, model_s):
        """x at time t from x at time s and its x_0 prediction `model_s` (DDIM)."""
        ns = self.noise_schedule
        dims = x.dim()
        h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
        sigma_s, sigma_t = ns.marginal_std(s), ns.marginal_std(t)
        phi_1 = torch.expm1(-h)
        return expand_dims(sigma_t / sigma_s, dims) * x - expand_dims(ns.marginal_alpha(t) * phi_1, dims) * model_s

    def second_order_update(self, x, model_prev_list, t_prev_list, t):
        """x at time t from x at t_prev_list[-1], given the x_0 predictions at the last two times."""
        ns = self.noise_schedule
        dims = x.dim()
        model_prev_1, model_prev_0 = model_prev_list
        t_prev_1, t_prev_0 = t_prev_list
        lambda_prev_1, lambda_prev_0, lambda_t = (ns.marginal_lambda(time) for time in (t_prev_1, t_prev_0, t))
        sigma_prev_0, sigma_t = ns.marginal_std(t_prev_0), ns.marginal_std(t)

        h_0 = lambda_prev_0 - lambda_prev_1
        h = lambda_t - lambda_prev_0
        r0 = h_0 / h
        D1_0 = expand_dims(1. / r0, dims) * (model_prev_0 - model_prev_1)
        alpha_phi = expand_dims(ns.marginal_alpha(t) * (torch.exp(-h) - 1.), dims)
        return expand_dims(sigma_t / sigma_prev_0, dims) * x - alpha_phi * model_prev_0 - 0.5 * alpha_phi * D1_0

    @torch.no_grad()
    def sample(self, x, steps):
        """x from t = 1 (noise) to t = 1/N in `steps` time-uniform steps, one model call each."""
        timesteps = torch.linspace(self.noise_schedule.T, 1. / self.noise_schedule.total_N, steps + 1).to(x.device)
        t = [timestep.expand(x.shape[0]) for timestep in timesteps]
        model_prev_list = [self.data_prediction_fn(x, t[0])]
        for step in range(1, steps + 1):
            # first order where there is no earlier x_0 yet, and at the last step of a short run:
            # the authors found the second-order extrapolation unsteady over its few long steps
            if step == 1 or (step == steps and steps < 15):
                x = self.first_order_update(x, t[step - 1], t[step], model_prev_list[-1])
            else:
                x = self.second_order_update(x, model_prev_list, t[step - 2:step], t[step])
            if step < steps:  # the last x needs no prediction
                model_prev_list = [model_prev_list[-1], self.data_prediction_fn(x, t[step])]
        return x


def interpolate_fn(x, xp, yp):
    """
    A piecewise linear function y = f(x), using xp and yp as keypoints.
    We implement f(x) in a differentiable way (i.e. applicable for autograd).
    The function f(x) is well-defined for all x-axis. (For x beyond the bounds of xp, we use the outmost
    points of xp to define the linear function.)

    Args:
        x: PyTorch tensor with shape [N, C], where N is the batch size, C is the number of channels
            (we use C = 1 for DPM-Solver).
        xp: PyTorch tensor with shape [C, K], where K is the number of keypoints.
        yp: PyTorch tensor with shape [C, K].
    Returns:
        The function values f(x), with shape [N, C].
    """
    N, K = x.shape[0], xp.shape[1]
    all_x = torch.cat([x.unsqueeze(2), xp.unsqueeze(0).repeat((N, 1, 1))], dim=2)
    sorted_all_x, x_indices = torch.sort(all_x, dim=2)
    x_idx = torch.argmin(x_indices, dim=2)
    cand_start_idx = x_idx - 1
    start_idx = torch.where(
        torch.eq(x_idx, 0),
        torch.tensor(1, device=x.device),
        torch.where(
            torch.eq(x_idx, K), torch.tensor(K - 2, device=x.device), cand_start_idx,
        ),
    )
    end_idx = torch.where(torch.eq(start_idx, cand_start_idx), start_idx + 2, start_idx + 1)
    start_x = torch.gather(sorted_all_x, dim=2, index=start_idx.unsqueeze(2)).squeeze(2)
    end_x = torch.gather(sorted_all_x, dim=2, index=end_idx.unsqueeze(2)).squeeze(2)
    start_idx2 = torch.where(
        torch.eq(x_idx, 0),
        torch.tensor(0, device=x.device),
        torch.where(
            torch.eq(x_idx, K), torch.tensor(K - 2, device=x.device), cand_start_idx,
        ),
    )
    y_positions_expanded = yp.unsqueeze(0).expand(N, -1, -1)
    start_y = torch.gather(y_positions_expanded, dim=2, index=start_idx2.unsqueeze(2)).squeeze(2)
    end_y = torch.gather(y_positions_expanded, dim=2, index=(start_idx2 + 1).unsqueeze(2)).squeeze(2)
    cand = start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)
    return cand


def expand_dims(v, dims):
    """`v` of shape [N] as [N, 1, ..., 1] with `dims` dimensions, to scale a batch per item."""
    return v[(...,) + (None,) * (dims - 1)]
