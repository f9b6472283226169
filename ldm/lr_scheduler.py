"""Learning-rate multipliers for LambdaLR (a config's scheduler_config).

They compute in Python floats, not numpy's: the value becomes the optimizer's lr and is pickled
into every checkpoint, where a numpy scalar makes torch.load(weights_only=True), and with it
main.py --resume, refuse the file."""
import bisect
import itertools
import logging
import math

logger = logging.getLogger(__name__)


def decay_fraction(n, warm_up_steps, end):
    """How far step n is from the end of the warm-up (0) to `end` (1), capped at 1; a warm-up as
    long as the schedule leaves no decay (upstream divided by zero there)."""
    return min((n - warm_up_steps) / (end - warm_up_steps), 1.0) if end > warm_up_steps else 1.0


class LambdaWarmUpCosineScheduler:
    """
    note: use with a base_lr of 1.0
    """
    def __init__(self, warm_up_steps, lr_min, lr_max, lr_start, max_decay_steps, verbosity_interval=0):
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.
        self.verbosity_interval = verbosity_interval

    def schedule(self, n):
        if self.verbosity_interval > 0:
            if n % self.verbosity_interval == 0: logger.debug(f"current step: {n}, recent lr-multiplier: {self.last_lr}")
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
            self.last_lr = lr
            return lr
        else:
            t = decay_fraction(n, self.lr_warm_up_steps, self.lr_max_decay_steps)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (
                    1 + math.cos(t * math.pi))
            self.last_lr = lr
            return lr

    def __call__(self, n):
        return self.schedule(n)


class LambdaWarmUpCosineScheduler2:
    """
    supports repeated iterations, configurable via lists
    note: use with a base_lr of 1.0.
    """
    def __init__(self, warm_up_steps, f_min, f_max, f_start, cycle_lengths, verbosity_interval=0):
        assert len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths)
        self.lr_warm_up_steps = warm_up_steps
        self.f_start = f_start
        self.f_min = f_min
        self.f_max = f_max
        self.cycle_lengths = cycle_lengths
        self.cum_cycles = list(itertools.accumulate([0, *self.cycle_lengths]))  # ints: see the module docstring
        self.last_f = 0.
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n):
        """The cycle step n falls in: cycle i holds cycle_lengths[i] steps, from cum_cycles[i] on
        (upstream's bisect_left put each boundary step in the cycle before, so the first cycle had
        one step more and the later ones never started at f_start). Past the last cycle it stays
        in the last one, at its end value: a run that trains longer than its schedule (more
        steps, a resumed run) keeps f_min instead of failing on an index."""
        return min(bisect.bisect_right(self.cum_cycles, n) - 1, len(self.cycle_lengths) - 1)

    def schedule(self, n):
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0:
            if n % self.verbosity_interval == 0: logger.debug(f"current step: {n}, recent lr-multiplier: {self.last_f}, "
                                                       f"current cycle {cycle}")
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            f = self.decay(n, cycle)
        self.last_f = f
        return f

    def decay(self, n, cycle):
        """The multiplier at step n of `cycle` after its warm-up: a half cosine from f_max to f_min."""
        t = decay_fraction(n, self.lr_warm_up_steps[cycle], self.cycle_lengths[cycle])
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (
                1 + math.cos(t * math.pi))

    def __call__(self, n):
        return self.schedule(n)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):

    def decay(self, n, cycle):
        """After the warm-up, on the line from f_max at the cycle's start to f_min at its end
        (upstream's line: it starts below f_max where the warm-up ends)."""
        length = self.cycle_lengths[cycle]
        n = min(n, length)  # past the end: stay at f_min
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
