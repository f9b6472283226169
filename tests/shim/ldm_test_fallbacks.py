"""TEST-ONLY stand-ins for features that other branches are adding to this fork.

* ``ldm.util.load_model_from_config(config, ckpt, device, *, unsafe_pickle=False,
  random_weights=False)`` and ``ldm.util.CheckpointError`` (checkpoint-loading branch);
* ``FrozenCLIPEmbedder(text_config=...)``, which configs/stable-diffusion/v1-tiny.yaml uses
  (encoder branch).

``install()`` adds each stand-in ONLY when the real thing is missing, so once those branches
are merged it is a no-op and the tests exercise the real code. Nothing here is used outside
tests/.
"""
import inspect
import zlib

import torch
import torch.nn as nn

TEST_EMBEDDER = "ldm_test_fallbacks.HashTextEmbedder"


class HashTextEmbedder(nn.Module):
    """Tiny text encoder: words hashed into a random embedding table, (B, 77, width)."""

    def __init__(self, width=32, vocab=4096, max_length=77, **unused):
        super().__init__()
        self.vocab, self.max_length = vocab, max_length
        self.embedding = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(max_length, width) * 0.02)

    def tokenize(self, texts):
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for row, text in enumerate(texts):
            words = [zlib.crc32(w.encode()) % self.vocab for w in text.lower().split()][:self.max_length]
            ids[row, :len(words)] = torch.tensor(words, dtype=torch.long)
        return ids

    def forward(self, texts):
        ids = self.tokenize(texts).to(self.embedding.weight.device)
        return self.embedding(ids) + self.position

    def encode(self, texts):
        return self(texts)


class CheckpointError(Exception):
    """Stand-in for ldm.util.CheckpointError."""


def _clip_embedder_supports_text_config():
    try:
        from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    except Exception:
        return False
    return "text_config" in inspect.signature(FrozenCLIPEmbedder.__init__).parameters


def _swap_text_encoder(config):
    cond = config.model.params.get("cond_stage_config")
    if cond is not None and str(cond.get("target", "")).endswith("FrozenCLIPEmbedder"):
        width = config.model.params.unet_config.params.get("context_dim", 32)
        config.model.params.cond_stage_config = {"target": TEST_EMBEDDER, "params": {"width": width}}
    return config


def _fallback_load_model_from_config(config, ckpt, device, *, unsafe_pickle=False, random_weights=False):
    from ldm.util import instantiate_from_config
    if not random_weights:
        import os
        if ckpt is None or not os.path.isfile(ckpt):
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=not unsafe_pickle)
            model = instantiate_from_config(config.model)
            model.load_state_dict(state.get("state_dict", state), strict=True)
        except Exception as e:
            raise CheckpointError(f"cannot load checkpoint {ckpt}: {type(e).__name__}") from e
    else:
        model = instantiate_from_config(config.model)
    return model.to(device).eval()


def install():
    global CheckpointError
    import ldm.util
    if hasattr(ldm.util, "CheckpointError"):
        CheckpointError = ldm.util.CheckpointError
    else:
        ldm.util.CheckpointError = CheckpointError
    real = getattr(ldm.util, "load_model_from_config", None)
    if real is None or "random_weights" not in inspect.signature(real).parameters:
        real = _fallback_load_model_from_config
    if _clip_embedder_supports_text_config():
        ldm.util.load_model_from_config = real
        return

    def load_with_test_embedder(config, *args, **kwargs):
        return real(_swap_text_encoder(config), *args, **kwargs)

    ldm.util.load_model_from_config = load_with_test_embedder
