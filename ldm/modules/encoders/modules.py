"""Conditioning encoders.

Only torch is needed to import this module, and SD's text encoder needs only torch and the
`tokenizers` library (clip_text.py). transformers, ``clip`` and the x-transformer code
are imported inside what uses them, which txt2img with SD or the embedded models never does.
"""
import functools
import gzip
import logging
import os
from functools import partial

import torch
import torch.nn as nn
from einops import repeat

from ldm.hub import ModelUnavailable, pretrained_source, url_unreachable
from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextTransformer, CLIPTokenizer
from ldm.checkpoints import CheckpointError
from ldm.util import ConfigError, check_choice, check_indices, first_line

logger = logging.getLogger(__name__)

# Hugging Face id of the text encoder used by Stable Diffusion 1.x.
CLIP_VERSION = "openai/clip-vit-large-patch14"

# CLIP's byte-pair-encoding vocabulary (from openai/CLIP, MIT licence; see CLIP_VOCAB_NOTICE.md).
CLIP_BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


class TextEncoderLoadError(CheckpointError, RuntimeError):
    """The requested text encoder could not be loaded; the message is one line for the user. A
    CheckpointError, so every script that reports unusable weights in one line reports this too."""


class AbstractEncoder(nn.Module):
    def __init__(self):
        super().__init__()

    def encode(self, *args, **kwargs):
        raise NotImplementedError



class ClassEmbedder(nn.Module):
    def __init__(self, embed_dim, n_classes=1000, key='class'):
        super().__init__()
        self.key = key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch, key=None):
        if key is None:
            key = self.key
        # this is for use in crossattn
        c = batch[key][:, None]
        check_indices(c, self.embedding.num_embeddings, "class labels", "n_classes")
        c = self.embedding(c)
        return c


class TransformerEmbedder(AbstractEncoder):
    """Some transformer encoder layers"""
    def __init__(self, n_embed, n_layer, vocab_size, max_seq_len=77, device=None):
        super().__init__()
        from ldm.modules.x_transformer import Encoder, TransformerWrapper
        # `device` is accepted for old configs only: tokens go where the weights are (upstream's
        # fixed "cuda" default failed on every machine without one)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer))

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    def forward(self, tokens):
        tokens = tokens.to(self.device)
        z = self.transformer(tokens, return_embeddings=True)
        return z

    def encode(self, x):
        return self(x)


def check_tokenizer_has_words(tokenizer, what, fix):
    """transformers 5, when the hub is unreachable or a folder lacks the vocabulary files, returns a
    tokenizer of only its special tokens instead of failing: every word of a prompt would become
    the unknown token and the model would ignore the prompt without a word. Raise instead."""
    n_special = len(set(tokenizer.all_special_tokens))
    if len(tokenizer.get_vocab()) <= n_special:
        raise TextEncoderLoadError(f"{what} did not load: it knows only its {n_special} special tokens (its vocabulary "
                                   f"files are missing, or the Hugging Face hub is unreachable); {fix}")


# The tokenizer of LDM's text-to-image models (BERTEmbedder): a Hugging Face hub id, or a local copy.
BERT_TOKENIZER = "bert-base-uncased"
BERT_VOCAB_SIZE = 30522

_BERT_TOKENIZER_FIX = (f"download it where there is network (huggingface-cli download {BERT_TOKENIZER}) or set "
                       "the config's cond_stage_config.params.tokenizer to a folder with its files")


class BERTTokenizer(AbstractEncoder):
    """ Uses a pretrained BERT tokenizer by huggingface. Vocab size: 30522"""
    def __init__(self, device="cuda", vq_interface=True, max_length=77, version=BERT_TOKENIZER,
                 vocab_size=BERT_VOCAB_SIZE):
        super().__init__()
        from transformers import BertTokenizerFast
        try:
            self.tokenizer = BertTokenizerFast.from_pretrained(pretrained_source(version))
        except ModelUnavailable as e:
            raise TextEncoderLoadError(f"Cannot load the BERT tokenizer: {e}; {_BERT_TOKENIZER_FIX}") from None
        except (OSError, ValueError) as e:
            raise TextEncoderLoadError(f"Cannot load the BERT tokenizer {version!r} ({type(e).__name__}); "
                                       f"{_BERT_TOKENIZER_FIX}") from e
        check_tokenizer_has_words(self.tokenizer, f"The BERT tokenizer {version!r}", _BERT_TOKENIZER_FIX)
        if self.tokenizer.vocab_size > vocab_size:  # its ids would index past the model's embedding table
            raise TextEncoderLoadError(f"The BERT tokenizer {version!r} has {self.tokenizer.vocab_size} tokens, but the "
                                       f"model embeds only {vocab_size}; use the tokenizer the model was trained with")
        self.device = device
        self.vq_interface = vq_interface
        self.max_length = max_length

    def forward(self, text):
        batch_encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        tokens = batch_encoding["input_ids"].to(self.device)
        return tokens

    @torch.no_grad()
    def encode(self, text):
        tokens = self(text)
        if not self.vq_interface:
            return tokens
        return None, None, [None, None, tokens]

    def decode(self, text):
        return text


class BERTEmbedder(AbstractEncoder):
    """Uses the BERT tokenizr model and add some transformer encoder layers"""
    def __init__(self, n_embed, n_layer, vocab_size=BERT_VOCAB_SIZE, max_seq_len=77,
                 device=None, use_tokenizer=True, embedding_dropout=0.0, tokenizer=BERT_TOKENIZER):
        super().__init__()
        from ldm.modules.x_transformer import Encoder, TransformerWrapper
        # `device` is accepted for old configs only: tokens go where the weights are (`device` below)
        self.use_tknz_fn = use_tokenizer
        if self.use_tknz_fn:
            self.tknz_fn = BERTTokenizer(device="cpu", vq_interface=False, max_length=max_seq_len, version=tokenizer,
                                         vocab_size=vocab_size)
        self.transformer = TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=embedding_dropout)

    @property
    def device(self):  # upstream's tokenizer sent tokens to a fixed "cuda"
        return next(self.transformer.parameters()).device

    def forward(self, text):
        tokens = self.tknz_fn(text).to(self.device) if self.use_tknz_fn else text
        z = self.transformer(tokens, return_embeddings=True)
        return z

    def encode(self, text):
        # output of length 77
        return self(text)


class SpatialRescaler(nn.Module):
    def __init__(self,
                 n_stages=1,
                 method='bilinear',
                 multiplier=0.5,
                 in_channels=3,
                 out_channels=None,
                 bias=False):
        super().__init__()
        self.n_stages = n_stages
        if n_stages < 0:
            raise ConfigError(f"n_stages of SpatialRescaler must be 0 or more, got {n_stages}")
        check_choice("cond_stage_config.params.method", method,
                     ('nearest', 'linear', 'bilinear', 'trilinear', 'bicubic', 'area'))
        self.multiplier = multiplier
        self.interpolator = partial(torch.nn.functional.interpolate, mode=method)
        self.remap_output = out_channels is not None
        if self.remap_output:
            logger.info("Spatial Rescaler mapping from %d to %d channels after resizing.", in_channels, out_channels)
            self.channel_mapper = nn.Conv2d(in_channels,out_channels,1,bias=bias)

    def forward(self,x):
        for stage in range(self.n_stages):
            x = self.interpolator(x, scale_factor=self.multiplier)


        if self.remap_output:
            x = self.channel_mapper(x)
        return x

    def encode(self, x):
        return self(x)

def _bytes_to_unicode():
    """CLIP's reversible byte -> printable unicode table (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def read_clip_bpe(bpe_path=CLIP_BPE_PATH):
    """Return (vocab, merges) of the CLIP tokenizer, built exactly as openai/CLIP's SimpleTokenizer does.

    vocab maps token -> id (49408 entries, <|startoftext|> = 49406, <|endoftext|> = 49407);
    merges are the 48894 "a b" merge rules in priority order.
    """
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {bpe_path}; it ships with the repository, restore it")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _clip_tokenizer_class():
    # for a CLIP loaded with transformers (a local directory or the hub) only.
    # transformers 4.x: CLIPTokenizerFast is the tokenizers-backed one (same ids as the hub's);
    # transformers 5.x: CLIPTokenizerFast is an alias of CLIPTokenizer.
    try:
        from transformers import CLIPTokenizerFast
        return CLIPTokenizerFast
    except ImportError:  # pragma: no cover - transformers without the tokenizers backend
        from transformers import CLIPTokenizer
        return CLIPTokenizer


def build_clip_tokenizer(bpe_path=CLIP_BPE_PATH, model_max_length=77):
    """The openai/clip-vit-large-patch14 tokenizer, built offline from the vendored BPE vocabulary.

    Same ids as the hub tokenizer: bos 49406, eos 49407, padding with <|endoftext|> (49407).
    Built once per process (cached); treat the returned tokenizer as read-only.
    """
    return _build_clip_tokenizer(os.path.abspath(bpe_path), int(model_max_length))


@functools.lru_cache(maxsize=None)
def _build_clip_tokenizer(bpe_path, model_max_length):
    tokenizer = CLIPTokenizer(*read_clip_bpe(bpe_path), model_max_length=model_max_length)
    logger.debug("Built the CLIP tokenizer from %s", bpe_path)
    return tokenizer


def clip_text_config(overrides=None):
    """CLIP ViT-L/14's text encoder config, with `overrides` (a config's `text_config`) applied."""
    fields = dict(overrides or {})
    unknown = sorted(set(fields) - set(CLIPTextConfig.__dataclass_fields__))
    if unknown:
        raise TextEncoderLoadError(f"text_config has no field(s) {', '.join(unknown)}; it takes "
                                   f"{', '.join(CLIPTextConfig.__dataclass_fields__)}")
    try:
        return CLIPTextConfig(**fields)
    except ValueError as err:
        raise TextEncoderLoadError(f"text_config: {err}") from None


def _load_clip_from_directory(path):
    """A transformers CLIP folder (save_pretrained); what it lacks is one TextEncoderLoadError."""
    from transformers import CLIPTextModel
    logger.info("Loading the CLIP text encoder and tokenizer from %s", path)
    fix = ("put its vocab.json and merges.txt next to the model (a diffusers pipeline keeps them in the "
           "tokenizer/ folder beside text_encoder/)")
    try:
        tokenizer = _clip_tokenizer_class().from_pretrained(path)
    except (OSError, ValueError) as e:  # transformers 4; transformers 5 returns a tokenizer without words
        raise TextEncoderLoadError(f"The CLIP tokenizer of {path} did not load ({type(e).__name__}): {fix}") from e
    check_tokenizer_has_words(tokenizer, f"The CLIP tokenizer of {path}", fix)
    try:
        return tokenizer, CLIPTextModel.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TextEncoderLoadError(f"The CLIP text encoder of {path} did not load ({type(e).__name__}): the folder "
                                   f"needs the config.json and weights that save_pretrained writes (a diffusers "
                                   f"pipeline keeps them in text_encoder/)") from e


_CLIP_HUB_FIX = (f"pass a local directory as `version`, or keep the default {CLIP_VERSION!r}, whose weights "
                 f"come from the Stable Diffusion checkpoint")


def _load_clip_from_hub(version):
    from transformers import CLIPTextModel
    try:
        tokenizer, model = _clip_tokenizer_class().from_pretrained(version), CLIPTextModel.from_pretrained(version)
    except (OSError, ValueError) as e:
        raise TextEncoderLoadError(f"Cannot load text encoder {version!r} from the Hugging Face hub "
                                   f"({first_line(e)}); {_CLIP_HUB_FIX}") from e
    check_tokenizer_has_words(tokenizer, f"The CLIP tokenizer of {version!r}", "pass a local directory as `version`")
    return tokenizer, model


def load_clip_text_encoder(version=CLIP_VERSION, text_config=None, max_length=77):
    """Return (tokenizer, CLIPTextModel) for `version`.

    - the default id CLIP_VERSION: tokenizer from the vendored BPE file and a randomly initialised
      ViT-L/14 text model of clip_text.py (``text_config`` overrides its fields); the weights come
      from the checkpoint;
    - a local directory (or the Hugging Face cache's models--ORG--NAME folder): ``from_pretrained``;
    - any other string is taken as a hub id (read from the local cache when the hub cannot be
      reached); TextEncoderLoadError if it cannot be fetched.
    """
    if version == CLIP_VERSION:
        config = clip_text_config(text_config)
        if not 2 < max_length <= config.max_position_embeddings:  # else an IndexError in the position embedding
            raise TextEncoderLoadError(f"max_length {max_length} does not fit the CLIP text encoder's "
                                       f"{config.max_position_embeddings} positions: set max_length from 3 to "
                                       f"{config.max_position_embeddings} in the config's cond_stage_config")
        return build_clip_tokenizer(model_max_length=max_length), CLIPTextTransformer(config)
    if text_config:
        raise TextEncoderLoadError(f"text_config is only used with version={CLIP_VERSION!r}, not with {version!r}; "
                                   f"remove one of them from the config")
    try:
        source = pretrained_source(version)
    except ModelUnavailable as e:
        raise TextEncoderLoadError(f"Cannot load text encoder: {e}; {_CLIP_HUB_FIX}") from None
    if os.path.isdir(source):  # given as a folder, or the hub's copy in the local cache
        return _load_clip_from_directory(source)
    return _load_clip_from_hub(source)


def clip_tokenizer_from_config(cond_stage_config):
    """(tokenizer, context length) of the FrozenCLIPEmbedder that `cond_stage_config` builds, read
    from the config alone (the vendored vocabulary: no weights, no model); None for any other
    text encoder, or a CLIP loaded from a directory or the hub, whose tokenizer comes with it."""
    target = (cond_stage_config or {}).get("target")
    params = (cond_stage_config or {}).get("params") or {}
    if target != f"{__name__}.FrozenCLIPEmbedder" or params.get("version", CLIP_VERSION) != CLIP_VERSION:
        return None
    max_length = int(params.get("max_length", 77))
    return build_clip_tokenizer(model_max_length=max_length), max_length


class FrozenCLIPEmbedder(AbstractEncoder):
    """The CLIP text encoder, without the hub: SD 1.x's conditioning, the last layer's hidden states.

    With the default `version` it is clip_text.py's, built from CLIP ViT-L/14's config with random
    weights, which the Stable Diffusion checkpoint (cond_stage_model.transformer.*) then fills;
    another `version` (a local directory, a hub id) loads with transformers.
    `device` is accepted for backward compatibility only: inputs follow the model's parameters.
    `trainable=True` skips the freezing, for configs that train the text encoder from scratch
    (with LatentDiffusion's ``cond_stage_trainable: true``, which also puts it in the optimizer).
    """
    def __init__(self, version=CLIP_VERSION, device="cuda", max_length=77, text_config=None, trainable=False):
        super().__init__()
        self.tokenizer, self.transformer = load_clip_text_encoder(version, text_config, max_length)
        self.max_length = max_length
        if not trainable:
            self.freeze()

    @property
    def device(self):
        return next(self.transformer.parameters()).device

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text):
        """Token ids, shape (B, max_length), padded with <|endoftext|> and truncated to max_length."""
        return self.tokenizer(text, truncation=True, max_length=self.max_length, padding="max_length",
                              return_tensors="pt")["input_ids"]

    def forward(self, text):
        tokens = self.tokenize(text).to(self.device)
        hidden = self.transformer(tokens)
        # a transformers CLIPTextModel (from a local directory or the hub) returns an output object
        return hidden if isinstance(hidden, torch.Tensor) else hidden.last_hidden_state

    def encode(self, text):
        return self(text)


OPENAI_CLIP_CACHE = os.path.expanduser("~/.cache/clip")  # where OpenAI's clip.load keeps its downloads


def load_openai_clip(name, *, unsafe_pickle=False):
    """The model of OpenAI's `clip.load(name)` (a model name or a file). clip.load downloads the
    weights of a name missing from its cache from OpenAI's URL, with no timeout: without network it
    ended in urllib's traceback, on a network that drops packets it waited minutes for one. So the
    URL is asked once, shortly, first; ModelUnavailable (one line, saying where the file goes) when
    it does not answer.

    A file goes through torch.jit.load, else a full torch.load: either can run code the file
    carries. clip.load checks a named model's download against its SHA-256, nothing checks a path
    given here, so a path needs unsafe_pickle=True (the scripts' --unsafe-pickle), as pickled
    checkpoints do (ldm.checkpoints)."""
    import inspect
    import clip
    url = getattr(inspect.getmodule(clip.load), "_MODELS", {}).get(name)  # the package's name -> URL table
    if url is None and os.path.isfile(name):
        if not unsafe_pickle:
            raise CheckpointError(f"{name} would be loaded by OpenAI CLIP's clip.load, which can run code the file "
                                  "carries; if you trust the file, pass --unsafe-pickle")
        logger.warning("Loading %s with clip.load (--unsafe-pickle): this can run arbitrary code, only use it for "
                       "files you trust", name)
    if url and not os.path.isfile(os.path.join(OPENAI_CLIP_CACHE, os.path.basename(url))):
        reason = url_unreachable(url)
        if reason:
            raise ModelUnavailable(f"OpenAI CLIP {name} is not in {OPENAI_CLIP_CACHE} and {url} {reason}: "
                                   "download it there where there is network, or pass the path of its .pt file "
                                   f"instead of {name!r}")
    return clip.load(name, device="cpu", jit=False, download_root=OPENAI_CLIP_CACHE)[0]


class FrozenCLIPTextEmbedder(nn.Module):
    """
    Uses the CLIP transformer encoder for text.
    """
    def __init__(self, version='ViT-L/14', device=None, max_length=77, n_repeat=1, normalize=True,
                 unsafe_pickle=False):
        super().__init__()
        # `device` is accepted for old callers only: tokens go where the weights are (`device` below)
        self.model = load_openai_clip(version, unsafe_pickle=unsafe_pickle)
        self.max_length = max_length
        self.n_repeat = n_repeat
        self.normalize = normalize

    @property
    def device(self):  # tokens go where the weights are
        return next(self.model.parameters()).device

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text):
        import clip
        # truncated to CLIP's 77 positions, as SD's text encoder does (clip.tokenize raised on a longer prompt)
        tokens = clip.tokenize(text, truncate=True).to(self.device)
        z = self.model.encode_text(tokens)
        if self.normalize:
            z = z / torch.linalg.norm(z, dim=1, keepdim=True)
        return z

    def encode(self, text):
        z = self(text)
        if z.ndim==2:
            z = z[:, None, :]
        z = repeat(z, 'b 1 d -> b k d', k=self.n_repeat)
        return z
