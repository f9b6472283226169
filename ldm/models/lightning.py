"""pytorch-lightning trains ldm's models; sampling never imports it.

The models (DDPM, LatentDiffusion, the autoencoders, the latent classifier) keep upstream's
Lightning training hooks (training_step, configure_optimizers, self.log, self.trainer ...) but
derive from `TrainableModule`, a plain nn.Module: importing Lightning costs a CPU txt2img run
about 3 s of its 8 (docs/benchmarks.md), for hooks that sampling never calls. main.py trains
`lightning_module(cls)`, the same class with LightningModule mixed in, where every hook finds
what it was written against.
"""
import contextlib
import functools
import itertools
import logging

import torch
from torch import nn

from ldm.modules.ema import LitEma, with_ema_of_parts_not_held

logger = logging.getLogger(__name__)


class TrainableModule(nn.Module):
    """Base of ldm's trainable models: an nn.Module with LightningModule's `device`, and the
    `ckpt_path` loading their configs share."""

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (what LightningModule.device says once Lightning moved it)."""
        return next(itertools.chain(self.parameters(), self.buffers())).device

    _ema_swapped_in = False

    def ema_tracked(self) -> nn.Module:
        """The module whose weights `model_ema` averages when the config sets use_ema."""
        return self

    def keep_ema(self, use_ema):
        self.use_ema = use_ema
        if use_ema:
            self.model_ema = LitEma(self.ema_tracked())
            logger.debug("Keeping EMAs of %d.", len(list(self.model_ema.buffers())))

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        """The EMA weights in place of the trained ones, which come back at the end. Re-entrant: LitEma
        stores one copy, so a nested scope would store the EMA weights, and the outer one then put
        them back as the trained weights."""
        swap = getattr(self, "use_ema", False) and not self._ema_swapped_in
        if swap:
            tracked = self.ema_tracked()
            self.model_ema.store(tracked.parameters())
            self.model_ema.copy_to(tracked)
            self._ema_swapped_in = True
            if context is not None:
                logger.info(f"{context}: Switched to EMA weights")
        try:
            yield None
        finally:
            if swap:
                self.model_ema.restore(tracked.parameters())
                self._ema_swapped_in = False
                if context is not None:
                    logger.info(f"{context}: Restored training weights")

    def on_train_start(self):
        self._ema_step = self.trainer.global_step  # 0, or the step a --resume restored

    def on_load_checkpoint(self, checkpoint):
        # --resume loads the state dict strictly: a run saved before its text encoder was averaged
        # too (upstream's cin-ldm-vq-f8 trains its class embedder) goes on with the encoder's EMA
        # starting at its weights
        checkpoint["state_dict"] = with_ema_of_parts_not_held(self, checkpoint["state_dict"])

    def on_train_batch_end(self, *args, **kwargs):
        # the EMA averages once per optimizer step: with gradients accumulated over K batches upstream
        # averaged after each batch, an effective decay of decay**K a step (and LitEma's warm-up
        # counted batches). An autoencoder's two optimizers both step on the batch that updates.
        if getattr(self, "use_ema", False) and self.trainer.global_step != self._ema_step:
            self._ema_step = self.trainer.global_step
            self.model_ema(self.ema_tracked())

    def init_from_ckpt(self, path, ignore_keys=(), only_model=False):
        """Weights from a checkpoint (safetensors, or torch.load with weights_only), but the keys
        starting with one of `ignore_keys`; non-strict, as a config's `ckpt_path` is often a part
        of the model (the first stage's weights). `only_model`: into `self.model` alone. Returns the
        keys of the model that the checkpoint left as they were."""
        from ldm.checkpoints import CheckpointError, WeightsMismatchError, load_state_dict
        try:
            state = load_state_dict(path, mapped=True)  # copied into the model below
        except CheckpointError as e:
            download = ("; scripts/download_first_stages.sh downloads the pretrained first stages"
                        if "first_stage_models" in str(path) else "")
            raise CheckpointError(f"{e} (the ckpt_path of the config's {type(self).__name__}{download})") from e
        kept = {key: value for key, value in state.items() if not key.startswith(tuple(ignore_keys))}
        if len(kept) < len(state):
            logger.info("Left out %d keys starting with %s", len(state) - len(kept), ", ".join(ignore_keys))
        target = self.model if only_model else self
        expected = target.state_dict()
        reshaped = [key for key in kept if key in expected and kept[key].shape != expected[key].shape]
        if reshaped:  # non-strict loading still fails on them, with a RuntimeError listing every one
            raise WeightsMismatchError(f"{path} has {len(reshaped)} weights with shapes other than this "
                                       f"{type(target).__name__}'s (e.g. {reshaped[0]}: "
                                       f"{tuple(kept[reshaped[0]].shape)}, the config's "
                                       f"{tuple(expected[reshaped[0]].shape)}); is it the checkpoint meant for "
                                       "the config's ckpt_path?")
        missing, unexpected = target.load_state_dict(kept, strict=False)
        if kept and len(unexpected) == len(kept):  # non-strict, yet not one weight fits: the wrong file
            raise CheckpointError(f"none of the {len(kept)} weights of {path} is one of this "
                                  f"{type(target).__name__}'s (e.g. {next(iter(kept))}); is it the checkpoint "
                                  f"meant for the config's ckpt_path?")
        if getattr(self, "use_ema", False):
            missing = self._restart_ema_not_held(kept, missing, path)
        logger.info("Restored from %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))
        if missing:
            logger.info("Missing keys: %s", missing)
        if unexpected:
            logger.info("Unexpected keys: %s", unexpected)
        return missing

    def _restart_ema_not_held(self, kept, missing, path):
        """The EMA of every part of the model (LitEma.parts) that `kept` holds none of starts from the
        part's weights: an exported model or SD's released weights, whose EMA is in the weights
        themselves, or a checkpoint saved before the text encoder was averaged. Returns `missing`
        without the EMA's keys then, which are not news: the log line says."""
        from ldm.checkpoints import WeightsMismatchError
        held, partial = self.model_ema.held_parts(kept, "model_ema.")
        if partial:
            raise WeightsMismatchError(f"{path} holds the EMA (model_ema.*) of some of the weights of {partial[0]} "
                                       "and not of others: is it the checkpoint meant for the config's ckpt_path?")
        fresh = [part for part in self.model_ema.parts() if part not in held]
        if not fresh:
            return missing
        self.model_ema.restart_from(self.ema_tracked(), fresh)
        logger.info("%s holds no EMA copy (model_ema.*) of %s: the EMA starts from its weights", path, ", ".join(fresh))
        return [key for key in missing if not key.startswith("model_ema.")]


@functools.cache
def lightning_module(cls: type) -> type:
    """`cls` with pytorch-lightning's LightningModule mixed in (`cls` itself if it is one already).
    The class comes first in the MRO, so its hooks and `device` override Lightning's defaults."""
    import pytorch_lightning as pl
    if issubclass(cls, pl.LightningModule):
        return cls
    return type(cls.__name__, (cls, pl.LightningModule), {"__module__": cls.__module__, "__doc__": cls.__doc__,
                                                          "__reduce_ex__": _reduce_ex, "_built_from": cls})


def _reduce_ex(self, protocol):
    # pickle finds a class by module and name, which lead to `cls`, not to the class built here; so its
    # instances are rebuilt from `cls` (a Lightning strategy that spawns processes, torch.save(model)).
    # A subclass written in code is found by its name as usual.
    reduced = object.__reduce_ex__(self, protocol)
    built_from = type(self).__dict__.get("_built_from")
    if built_from is None:
        return reduced
    _, (_, *args), *state = reduced
    return (_new_lightning_instance, (built_from, *args), *state)


def _new_lightning_instance(cls, *args):
    mixed = lightning_module(cls)
    return mixed.__new__(mixed, *args)
