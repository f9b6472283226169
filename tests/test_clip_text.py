"""clip_text.py against transformers: the same token ids, the same hidden states, the same
initialisation, and sampling that imports neither transformers nor pytorch-lightning."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY_CONFIG, text_transformer_of, transformers_clip_text_model, write_clip_vocab_files
from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextTransformer
from ldm.modules.encoders.modules import build_clip_tokenizer

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "a photo of a cat", "A Photo Of A CAT", "a red chair with four legs", "", "   ", "a\tchair\n\nin  a room",
    "it's a dog's life, isn't it? we'll see; they'd've", "1234567 and 3.14159", "hello-world_foo/bar@baz.com #sd",
    "café, naïve, Ångström, Straße", "ｆｕｌｌｗｉｄｔｈ", "東京タワーの写真", "🐱🐶 emoji 🎨!!", "a <|endoftext|> inside",
    "<|startoftext|>already marked", "\u00e9 vs e\u0301 (composed and decomposed)", "x" * 300,
    "a portrait of a girl in a yellow raincoat at a bus stop, oil painting, trending on artstation, " * 4,
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' CLIPTokenizerFast from the same vocabulary, as the hub's files would give it."""
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    write_clip_vocab_files(folder)
    return transformers.CLIPTokenizerFast.from_pretrained(
        folder, local_files_only=True, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_token_ids_are_transformers(hf_tokenizer, prompt):
    ours = build_clip_tokenizer()
    assert ours(prompt)["input_ids"] == hf_tokenizer(prompt)["input_ids"]
    assert ours(prompt, add_special_tokens=False)["input_ids"] == \
        hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for max_length in (77, 32, 3):
        assert ours(prompt, truncation=True, max_length=max_length)["input_ids"] == \
            hf_tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]


def test_padded_batches_are_transformers(hf_tokenizer):
    ours = build_clip_tokenizer()
    for max_length in (77, 32):
        expected = hf_tokenizer(PROMPTS, truncation=True, max_length=max_length, padding="max_length",
                                return_tensors="pt")["input_ids"]
        got = ours(PROMPTS, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
        assert torch.equal(got["input_ids"], expected)


def test_unsupported_call_options_are_refused():
    with pytest.raises(ValueError, match="padding"):
        build_clip_tokenizer()(["a", "b c"], padding="longest")


SMALL = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                       max_position_embeddings=32)


@pytest.mark.parametrize("config", [SMALL, CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                           num_attention_heads=3, hidden_act="gelu")])
def test_hidden_states_are_transformers(config):
    torch.manual_seed(0)
    reference = transformers_clip_text_model(config)
    ours = CLIPTextTransformer(config).eval()
    ours.load_state_dict(text_transformer_of(reference).state_dict(), strict=True)  # transformers' names, all of them
    tokens = build_clip_tokenizer()(PROMPTS, truncation=True, max_length=config.max_position_embeddings,
                                    padding="max_length", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(input_ids=tokens).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_the_shipped_models_text_encoder_is_transformers():
    # real trained weights (the 16 px embedded model, trained with transformers' CLIPTextModel)
    prefix = "cond_stage_model.transformer."
    weights = {k[len(prefix):]: v.float() for k, v in
               load_file(REPO / "models/embedded/procedural-t2i-16px.safetensors").items() if k.startswith(prefix)}
    config = CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                            max_position_embeddings=weights["embeddings.position_embedding.weight"].shape[0])
    reference, ours = transformers_clip_text_model(config), CLIPTextTransformer(config).eval()
    text_transformer_of(reference).load_state_dict(weights)
    ours.load_state_dict(weights)
    tokens = build_clip_tokenizer()(["a red chair", "a face with glasses and blue eyes", ""], truncation=True,
                                    max_length=config.max_position_embeddings, padding="max_length",
                                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(input_ids=tokens).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_initialisation_is_transformers():
    # the embedded configs train their text encoder from scratch: the same spread per weight as
    # transformers' CLIP gave it, so a retraining starts where the shipped model's training did
    torch.manual_seed(0)
    reference = dict(text_transformer_of(transformers_clip_text_model(SMALL)).named_parameters())
    ours = dict(CLIPTextTransformer(SMALL).named_parameters())
    assert ours.keys() == reference.keys()
    for name, p in ours.items():
        expected = reference[name]
        if expected.std() == 0:  # biases, layer norms
            assert torch.equal(p, expected), name
        else:
            assert abs(p.std() / expected.std() - 1) < 0.15 and abs(p.mean()) < 0.1 * expected.std(), name


def test_sampling_imports_neither_transformers_nor_lightning(tmp_path):
    # importing them took ~3 s of the ~8 s the README's first command takes on 2 cores
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); import txt2img; "
            f"txt2img.main(['--config', {str(TINY_CONFIG)!r}, '--random-weights', '--H', '64', '--W', '64', "
            f"'--n_samples', '2', '--n_iter', '1', '--ddim_steps', '2', '--consistent-attn', "
            f"'--outdir', {str(tmp_path)!r}]); "
            "print(sorted(m for m in ('transformers', 'pytorch_lightning', 'lightning_fabric') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "samples").is_dir()
