"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"):
DDIM's schedule and update, fed a linear-multistep (Adams-Bashforth) combination of the current
and up to three earlier noise estimates; the first step, with no history, is a pseudo improved
Euler step that calls the model twice."""

from ldm.models.diffusion.ddim import DDIMSampler


class PLMSSampler(DDIMSampler):
    stochastic = False  # the multistep estimate assumes the deterministic (eta = 0) trajectory

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0., verbose=True):
        if ddim_eta != 0:
            raise ValueError(f"PLMSSampler is deterministic: eta must be 0, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def denoise_step(self, x, t, t_next, index, eps, update, history):
        e_t = eps(x, t)
        if len(history) == 0:
            # Pseudo Improved Euler (2nd order)
            x_prev, _ = update(x, e_t, index)
            e_t_prime = (e_t + eps(x_prev, t_next)) / 2
        elif len(history) == 1:
            # 2nd order Pseudo Linear Multistep (Adams-Bashforth)
            e_t_prime = (3 * e_t - history[-1]) / 2
        elif len(history) == 2:
            # 3nd order Pseudo Linear Multistep (Adams-Bashforth)
            e_t_prime = (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
        else:
            # 4nd order Pseudo Linear Multistep (Adams-Bashforth)
            e_t_prime = (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24
        history.append(e_t)
        if len(history) >= 4:
            history.pop(0)
        return update(x, e_t_prime, index)
