"""CLIP's text encoder and tokenizer, as Stable Diffusion 1.x uses them, in plain torch and the
`tokenizers` library.

Why not transformers' CLIPTextModel and CLIPTokenizer: importing them costs a CPU txt2img run
about 2.5 s, and with pytorch-lightning's import (ldm/models/lightning.py) most of the time it
spent before sampling (docs/benchmarks.md). What SD needs of them is below. The parameter names
are transformers' (`embeddings.token_embedding.weight`, `encoder.layers.0.self_attn.q_proj.weight`
...), so SD checkpoints and transformers' weights load as they are, and the tokenizer is the
pipeline transformers builds for CLIP. tests/test_clip_text.py checks both against transformers:
the same ids, the same hidden states up to float rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import nn

START_OF_TEXT, END_OF_TEXT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of other non-space characters
WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def quick_gelu(x):
    """The GELU approximation OpenAI trained CLIP with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class CLIPTextConfig:
    """The text half of openai/clip-vit-large-patch14's config.json (what SD 1.x checkpoints hold
    under cond_stage_model.transformer.*), in transformers' field names."""
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768  # CLIP's text projection, which SD does not use; kept for configs that set it
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))  # (B, nh, T, hs)
        # causal: a token reads only the tokens before it, as CLIP was trained (SD's padding
        # tokens after <|endoftext|> therefore carry a summary of the whole prompt)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)


class CLIPTextTransformer(nn.Module):
    """Token ids (B, T) -> the last layer's hidden states (B, T, hidden_size), after the final
    layer norm: transformers' `CLIPTextModel(...).last_hidden_state`, what SD conditions on."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        """transformers' initialisation of CLIP, for the text encoders trained from scratch
        (configs/embedded): residual branches scaled down by the depth, biases zero."""
        d, depth = self.config.hidden_size, 2 * self.config.num_hidden_layers
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.Linear):  # its weight: by the layer it belongs to, below
            nn.init.zeros_(module.bias)
        elif isinstance(module, CLIPAttention):
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                nn.init.normal_(proj.weight, std=d ** -0.5 / math.sqrt(depth))
            nn.init.normal_(module.out_proj.weight, std=d ** -0.5)
        elif isinstance(module, CLIPMLP):
            nn.init.normal_(module.fc1.weight, std=(2 * d) ** -0.5)
            nn.init.normal_(module.fc2.weight, std=d ** -0.5 / math.sqrt(depth))

    def forward(self, input_ids):
        T = input_ids.shape[1]
        positions = torch.arange(T, device=input_ids.device)
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(positions)  # (B, T, d)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTokenizer:
    """CLIP's byte-pair tokenizer: transformers' CLIPTokenizerFast pipeline (NFC, whitespace
    folded, lower case; CLIP's word pattern; byte-level BPE with '</w>' ends) on the `tokenizers`
    library, and the part of transformers' call that ldm uses.

    `tokenizer(text, truncation=, max_length=, padding=, add_special_tokens=, return_tensors=)`
    -> {"input_ids": ids}: a list of ids for a string, a list of lists for a list of strings, a
    LongTensor with return_tensors="pt". Ids are <|startoftext|>, the text's, <|endoftext|>;
    truncation keeps both ends, padding="max_length" pads with <|endoftext|> (as SD was trained).
    """

    def __init__(self, vocab: dict, merges: list, model_max_length: int = 77):
        bpe = BPE(vocab, [tuple(m.split()) for m in merges], continuing_subword_prefix="", end_of_word_suffix="</w>",
                  unk_token=END_OF_TEXT, fuse_unk=False)
        self._tokenizer = Tokenizer(bpe)
        self._tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(WORDS), behavior="removed", invert=True),
             pre_tokenizers.ByteLevel(add_prefix_space=False)])
        self._tokenizer.add_special_tokens([START_OF_TEXT, END_OF_TEXT])
        self.bos_token_id, self.eos_token_id = vocab[START_OF_TEXT], vocab[END_OF_TEXT]
        self.model_max_length = model_max_length

    def __call__(self, text, truncation=False, max_length=None, padding=False, add_special_tokens=True,
                 return_tensors=None):
        if padding not in (False, "max_length") or return_tensors not in (None, "pt"):
            raise ValueError(f"CLIPTokenizer pads to max_length or not at all and returns lists or 'pt' "
                             f"tensors, got padding={padding!r}, return_tensors={return_tensors!r}")
        max_length = max_length or self.model_max_length
        texts = [text] if isinstance(text, str) else list(text)
        specials = 2 if add_special_tokens else 0
        ids = []
        for encoding in self._tokenizer.encode_batch(texts, add_special_tokens=False):
            tokens = encoding.ids[:max_length - specials] if truncation else encoding.ids
            if add_special_tokens:
                tokens = [self.bos_token_id, *tokens, self.eos_token_id]
            if padding == "max_length":
                tokens += [self.eos_token_id] * (max_length - len(tokens))
            ids.append(tokens)
        if return_tensors == "pt":
            ids = torch.tensor(ids, dtype=torch.long)
        return {"input_ids": ids[0] if isinstance(text, str) and return_tensors is None else ids}


__all__ = ["CLIPTextConfig", "CLIPTextTransformer", "CLIPTokenizer", "START_OF_TEXT", "END_OF_TEXT"]
