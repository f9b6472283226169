"""The CLIP text encoder and tokenizer work offline (no Hugging Face hub); LDM's BERT tokenizer, which
comes from the hub, says so when it cannot load instead of turning every word into [UNK]."""
import os
import subprocess
import sys
from importlib.metadata import version as package_version

import pytest
import torch

from ldm.modules.encoders.modules import (
    CLIP_VERSION, FrozenCLIPEmbedder, TextEncoderLoadError, build_clip_tokenizer, read_clip_bpe)
from ldm.util import instantiate_from_config
from conftest import text_transformer_of, transformers_clip_text_model, write_clip_vocab_files

BOS, EOS = 49406, 49407
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tokenizer whose files are missing: transformers 4 raises OSError, transformers 5 returns one
# that knows only its special tokens (offline, or from a folder without vocabulary files)
TRANSFORMERS_5 = int(package_version("transformers").split(".")[0]) >= 5


def test_importing_encoders_needs_no_clip_or_x_transformer():
    code = ("import sys, ldm.modules.encoders.modules; "
            "print(sorted(m for m in ('clip', 'ldm.modules.x_transformer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


def test_vocab_matches_clip():
    vocab, merges = read_clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368


def test_tokenizer_ids_match_the_hub_tokenizer():
    tokenizer = build_clip_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"] == [BOS, 320, 1125, 539, 320, 2368, EOS]
    # CLIP lower-cases, splits digits one by one and splits punctuation
    assert tokenizer("Hello World")["input_ids"] == [BOS, 3306, 1002, EOS]
    assert tokenizer("123")["input_ids"] == [BOS, 272, 273, 274, EOS]


def test_tokenizer_pads_with_endoftext_and_truncates_to_77():
    tokenizer = build_clip_tokenizer()
    batch = tokenizer(["a photo of a cat", "cat " * 200], truncation=True, max_length=77,
                      padding="max_length", return_tensors="pt")
    ids = batch["input_ids"]
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ids[0, 7:] == EOS).all()
    assert ids[1, 0] == BOS and ids[1, -1] == EOS and (ids[1, 1:-1] == 2368).all()


def test_tokenizer_is_built_once():
    assert build_clip_tokenizer() is build_clip_tokenizer()
    assert build_clip_tokenizer(model_max_length=77) is FrozenCLIPEmbedder(text_config=TINY_TEXT).tokenizer


def test_hub_id_offline_is_a_clear_error():  # conftest sets HF_HUB_OFFLINE; tests/test_hub.py: an unreachable hub
    with pytest.raises(TextEncoderLoadError) as info:
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")
    message = str(info.value)
    assert "\n" not in message
    assert "openai/clip-vit-base-patch32" in message and "hub" in message and "local directory" in message


def test_a_hub_model_cached_without_its_tokenizer_is_an_error(monkeypatch, tmp_path, tiny_config):
    # offline, a hub id is read from its snapshot in the Hugging Face cache; one holding the weights
    # but not the tokenizer's files is refused as a folder without them would be (transformers 5
    # used to give a tokenizer of special tokens only, transformers 4 an OSError)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--openai--clip-vit-base-patch32" / "snapshots" / "0123abcd"
    encoder = instantiate_from_config(tiny_config.model.params.cond_stage_config)
    transformers_clip_text_model(encoder.transformer.config).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    with pytest.raises(TextEncoderLoadError) as info:
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")
    assert str(info.value).startswith(f"The CLIP tokenizer of {snapshot} did not load")


def test_text_config_with_a_non_default_version_is_refused(tmp_path):
    with pytest.raises(TextEncoderLoadError, match="text_config"):
        FrozenCLIPEmbedder(version=str(tmp_path), text_config={"hidden_size": 32})


@pytest.mark.parametrize("text_config, words", [
    ({"hidden_sise": 32}, "no field(s) hidden_sise"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"hidden_size": 30, "num_attention_heads": 4}, "not a multiple of num_attention_heads"),
])
def test_a_bad_text_config_is_one_line(text_config, words):
    with pytest.raises(TextEncoderLoadError, match=r"^text_config") as info:
        FrozenCLIPEmbedder(text_config=text_config)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_default_version_builds_vit_l14_text_encoder_on_meta():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(version=CLIP_VERSION)
    config = encoder.transformer.config
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (768, 12, 3072)
    assert config.hidden_act == "quick_gelu" and config.max_position_embeddings == 77
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, 1)
    assert encoder.device.type == "meta"
    assert not any(p.requires_grad for p in encoder.parameters())


def test_tiny_config_encodes_text_to_77_tokens(tiny_config):
    torch.manual_seed(0)
    encoder = instantiate_from_config(tiny_config.model.params.cond_stage_config)
    with torch.no_grad():
        z = encoder.encode(["a photo of a cat", "a red chair"])
    assert z.shape == (2, 77, 32)
    assert torch.isfinite(z).all()
    assert not torch.equal(z[0], z[1])
    assert encoder.device == torch.device("cpu")


def test_local_directory_loads_with_from_pretrained(tmp_path, tiny_config):
    # a transformers CLIP folder (what save_pretrained writes) holding the tiny encoder's weights
    import transformers
    torch.manual_seed(0)
    encoder = instantiate_from_config(tiny_config.model.params.cond_stage_config)
    folder = transformers_clip_text_model(encoder.transformer.config)
    text_transformer_of(folder).load_state_dict(encoder.transformer.state_dict())
    folder.save_pretrained(tmp_path)
    write_clip_vocab_files(tmp_path)
    reloaded = FrozenCLIPEmbedder(version=str(tmp_path), device="cuda")  # device must not force cuda
    assert isinstance(reloaded.transformer, transformers.CLIPTextModel)
    assert reloaded.device == torch.device("cpu")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode(["a cat"]), encoder.encode(["a cat"]))
    cache = tmp_path / "models--openai--clip-vit-large-patch14"  # the hub cache: the snapshot refs/main names
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("9e8f")
    (cache / "snapshots").mkdir()
    (cache / "snapshots" / "9e8f").symlink_to(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(FrozenCLIPEmbedder(version=str(cache)).encode(["a cat"]), encoder.encode(["a cat"]))


def test_a_local_directory_without_tokenizer_files_is_an_error(tmp_path, tiny_config):
    # a diffusers text_encoder/ folder: the weights without vocab.json and merges.txt, for which
    # transformers 5 made a tokenizer of 2 special tokens, and every prompt encoded as unknowns
    # (transformers 4 raised OSError: a traceback)
    encoder = instantiate_from_config(tiny_config.model.params.cond_stage_config)
    transformers_clip_text_model(encoder.transformer.config).save_pretrained(tmp_path)
    with pytest.raises(TextEncoderLoadError) as info:
        FrozenCLIPEmbedder(version=str(tmp_path))
    reason = ": it knows only its 2 special tokens" if TRANSFORMERS_5 else " (OSError)"
    assert f"The CLIP tokenizer of {tmp_path} did not load{reason}" in str(info.value)
    assert "vocab.json and merges.txt" in str(info.value)


def test_a_local_directory_with_only_the_tokenizer_is_an_error(tmp_path):
    # a diffusers tokenizer/ folder given for the text encoder: OSError (a traceback) from transformers
    write_clip_vocab_files(tmp_path)
    with pytest.raises(TextEncoderLoadError) as info:
        FrozenCLIPEmbedder(version=str(tmp_path))
    assert str(info.value).startswith(f"The CLIP text encoder of {tmp_path} did not load (OSError): the folder needs "
                                      "the config.json and weights that save_pretrained writes")


# LDM's text-to-image models (txt2img-1p4B-eval.yaml, --laion400m) tokenize with BERT's bert-base-uncased

def test_a_bert_tokenizer_that_did_not_load_is_an_error_not_a_model_that_ignores_the_prompt(tmp_path):
    # transformers 5, offline or given a folder without vocab.txt, returns a tokenizer of its 5
    # special tokens: every word became [UNK], and the model sampled without its prompt
    from ldm.modules.encoders.modules import BERTEmbedder
    with pytest.raises(TextEncoderLoadError) as info:
        BERTEmbedder(n_embed=32, n_layer=1, tokenizer=str(tmp_path))
    message = str(info.value)
    reason = "did not load: it knows only its 5 special tokens" if TRANSFORMERS_5 else "(OSError)"
    assert f"the BERT tokenizer '{tmp_path}'".lower() in message.lower() and reason in message, message
    assert "huggingface-cli download bert-base-uncased" in message and "cond_stage_config.params.tokenizer" in message


def test_a_local_bert_tokenizer_folder_is_used(tmp_path):
    from ldm.modules.encoders.modules import BERTEmbedder
    words = ["a", "photo", "of", "chair"]
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    vocab += [f"word{i}" for i in range(30522 - len(vocab))]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    embedder = BERTEmbedder(n_embed=32, n_layer=1, max_seq_len=8, tokenizer=str(tmp_path))
    tokens = embedder.tknz_fn(["a photo of a chair"])
    assert tokens.tolist() == [[101, 104, 105, 106, 104, 107, 102, 0]]  # [CLS] a photo of a chair [SEP] [PAD]
    assert embedder.encode(["a photo of a chair"]).shape == (1, 8, 32)
    # upstream's configs say device: cuda; the tokens follow the weights all the same
    old_config = BERTEmbedder(n_embed=32, n_layer=1, max_seq_len=8, tokenizer=str(tmp_path), device="cuda")
    assert old_config.device == torch.device("cpu")
    cache = tmp_path / "models--bert-base-uncased"  # the hub cache: the snapshot refs/main names
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("5a6b")
    (cache / "snapshots" / "5a6b").mkdir(parents=True)
    (cache / "snapshots" / "5a6b" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cached = BERTEmbedder(n_embed=32, n_layer=1, max_seq_len=8, tokenizer=str(cache))
    assert cached.tknz_fn(["a photo of a chair"]).tolist() == tokens.tolist()
    # a tokenizer whose ids go past the model's embedding table
    with pytest.raises(TextEncoderLoadError, match="has 30522 tokens, but the model embeds only 8192"):
        BERTEmbedder(n_embed=32, n_layer=1, vocab_size=8192, tokenizer=str(tmp_path))


@pytest.mark.parametrize("device", [None, "cuda"])
def test_transformer_embedder_sends_tokens_where_its_weights_are(device):
    # upstream sent them to a fixed device, "cuda" by default: on a machine without one, every call failed
    from ldm.modules.encoders.modules import TransformerEmbedder
    embedder = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=50, max_seq_len=8, device=device)
    tokens = torch.randint(0, 50, (2, 8))
    assert embedder.device == torch.device("cpu")
    assert embedder(tokens).shape == (2, 8, 16)


def test_transformer_embedder_refuses_too_many_tokens_or_ids_outside_its_vocabulary_in_one_line():
    # both were an IndexError deep in an embedding table
    from ldm.modules.encoders.modules import TransformerEmbedder
    embedder = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=50, max_seq_len=8)
    with pytest.raises(ValueError, match="9 tokens, more than the 8 positions of this text encoder"):
        embedder(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50\) \(vocab_size\), got 0 to 50"):
        embedder(torch.tensor([[0, 50]]))


def test_a_misspelt_transformer_layer_option_is_an_error():
    # upstream's AttentionLayers kept what began with ff_ or attn_ and dropped the rest: use_rmsnrom=True
    # built layers with the default LayerNorm
    from ldm.modules.x_transformer import Encoder
    assert Encoder(dim=16, depth=1, heads=2, use_rmsnorm=True, attn_dim_head=8, ff_mult=2) is not None
    with pytest.raises(TypeError, match=r"Encoder got unexpected keyword arguments \['use_rmsnrom'\]"):
        Encoder(dim=16, depth=1, heads=2, use_rmsnrom=True)


def test_a_spatial_rescaler_method_torch_lacks_is_a_config_error():
    from ldm.modules.encoders.modules import SpatialRescaler
    from ldm.util import ConfigError
    with pytest.raises(ConfigError, match="method is 'cubic'; it takes one of 'nearest'"):
        SpatialRescaler(method="cubic")


def test_a_class_label_outside_the_embedders_classes_is_one_line():
    # class 1000 (cin256-v2's unconditional class) on cin-ldm-vq-f8's 1000 classes was an IndexError
    from ldm.modules.encoders.modules import ClassEmbedder
    embedder = ClassEmbedder(embed_dim=4, n_classes=1000, key="class_label")
    assert embedder({"class_label": torch.tensor([0, 999])}).shape == (2, 1, 4)
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 1000\) \(n_classes\), got 5 to 1000"):
        embedder({"class_label": torch.tensor([5, 1000])})
