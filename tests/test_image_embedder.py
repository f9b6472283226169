"""ldm.image_embedder: embedding-based consistency from a local DINO/CLIP folder, and its use in the benchmark."""
import csv
import math

import pytest
import torch

from ldm.image_embedder import EmbedderError, embedding_similarity, load_embedder, reference_similarity
from test_consistency_benchmark import one_error_line, run


def save_tiny_model(path, kind):
    """A randomly initialised tiny model in the transformers layout, as a user's local folder would hold."""
    torch.manual_seed(0)
    if kind == "dinov2":
        from transformers import Dinov2Config, Dinov2Model
        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              image_size=28, patch_size=7)
        Dinov2Model(config).save_pretrained(path)
    else:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
        config = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=28, patch_size=7, projection_dim=16)
        CLIPVisionModelWithProjection(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("kind, dim", [("dinov2", 32), ("clip", 16)])
def test_embeddings_are_unit_vectors_and_similarity_is_one_for_copies(tmp_path, kind, dim):
    embedder = load_embedder(save_tiny_model(tmp_path / kind, kind))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    embeddings = embedder(images)
    assert embeddings.shape == (3, dim)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)
    copies = embedder(images[:1].repeat(4, 1, 1, 1))
    assert embedding_similarity(copies) == pytest.approx(1.0, abs=1e-5)
    assert embedding_similarity(embeddings) < 0.9999


def test_similarity_is_the_mean_over_pairs_of_different_images():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    expected = (0.0 + 2 ** -0.5 + 2 ** -0.5) / 3  # pairs (0,1), (0,2), (1,2)
    assert embedding_similarity(e) == pytest.approx(expected)
    assert math.isnan(embedding_similarity(e[:1]))


def test_reference_similarity_is_the_mean_cosine_to_the_reference():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    assert reference_similarity(e, e[:1]) == pytest.approx((1.0 + 0.0 + 2 ** -0.5) / 3)


def test_a_benchmark_reference_image_of_your_own_is_the_image_rows_anchor_for_any_prompt(tmp_path):
    """--reference-image: a file is the anchor of the image:* rows, and ref. sim compares every row's
    images with it (needs no procedural prompt; ref. agreement, which reads a scene, stays n/a)."""
    from PIL import Image

    model_dir = save_tiny_model(tmp_path / "dino", "dinov2")
    # the shipped 16 px model: trained attention, so the anchor's effect on the images is far above
    # float noise (a random tiny SD UNet moved the embeddings by ~1e-7, which rounding could hide)
    common = ["--config", "configs/embedded/procedural-t2i-16px.yaml", "--n", "2", "--steps", "4",
              "--seeds", "0", "--prompts", "a photo of a chair", "--embedder", model_dir,
              "--settings", "none", "image:middle+inner"]
    rows = {}
    for colour in ("red", "blue"):
        Image.new("RGB", (300, 200), colour).save(tmp_path / f"{colour}.png")
        result = run(*common, "--reference-image", tmp_path / f"{colour}.png", "--outdir", tmp_path / colour)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(tmp_path / colour / "run-001" / "results.csv") as f:
            rows[colour] = {r["setting"]: r for r in csv.DictReader(f)}
    for by_setting in rows.values():
        assert all(-1.0 <= float(r["reference_similarity"]) <= 1.0 for r in by_setting.values())
        assert all(math.isnan(float(r["reference_agreement"])) for r in by_setting.values())
    similarity = {colour: {setting: float(r["embedding_similarity"]) for setting, r in by_setting.items()}
                  for colour, by_setting in rows.items()}
    assert similarity["red"]["none"] == similarity["blue"]["none"]
    # the anchor is the file: measured 0.9128 (red) against 0.9105 (blue), 2026-12-05
    assert abs(similarity["red"]["image:middle+inner"] - similarity["blue"]["image:middle+inner"]) > 2e-4
    assert rows["red"]["none"]["reference_similarity"] != rows["blue"]["none"]["reference_similarity"]
    assert "ref. sim" in result.stdout
    (tmp_path / "notes.png").write_text("not an image")
    one_error_line(run(*common, "--reference-image", tmp_path / "notes.png", "--outdir", tmp_path / "out"),
                   "cannot read --reference-image")
    assert not (tmp_path / "out").exists()


def test_the_hugging_face_cache_folder_of_a_model_loads_its_snapshot(tmp_path):
    """models--facebook--dinov2-small as the hub cache lays it out: the snapshot refs/main names."""
    cache = tmp_path / "models--facebook--dinov2-small"
    save_tiny_model(cache / "snapshots" / "0a1b", "dinov2")
    (cache / "refs").mkdir()
    (cache / "refs" / "main").write_text("0a1b")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(load_embedder(cache)(images), load_embedder(cache / "snapshots" / "0a1b")(images))


def test_a_clip_vision_folder_without_its_projection_is_refused_not_filled_at_random(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     image_size=28, patch_size=7)).save_pretrained(tmp_path)
    with pytest.raises(EmbedderError, match="lacks 1 weight.s., e.g. visual_projection.weight, which would embed"):
        load_embedder(tmp_path)


def test_a_folder_without_a_model_is_refused_with_what_to_give(tmp_path):
    with pytest.raises(EmbedderError, match="not a local model directory with a config.json"):
        load_embedder(tmp_path)


def test_benchmark_measures_any_prompt_with_an_embedder(tmp_path):
    model_dir = save_tiny_model(tmp_path / "dino", "dinov2")
    result = run("--random-weights", "--n", "2", "--steps", "1", "--seeds", "0", "--settings", "none", "all:all",
                 "--prompts", "a photo of an astronaut", "--embedder", model_dir, "--outdir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "out" / "run-001" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows] == ["none", "all:all"]
    for row in rows:
        assert -1.0 <= float(row["embedding_similarity"]) <= 1.0
        assert math.isnan(float(row["agreement"]))  # no procedural read-back for this prompt
    assert "embedding sim" in result.stdout


def test_benchmark_with_a_bad_embedder_is_one_error_line(tmp_path):
    result = run("--random-weights", "--prompts", "a photo of a chair", "--embedder", tmp_path / "nothing",
                 "--outdir", tmp_path / "out")
    one_error_line(result, "is not a local model directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["subject:all", "image:all"])
def test_subject_and_image_settings_need_a_procedural_prompt(tmp_path, setting):
    result = run("--random-weights", "--prompts", "a photo of a chair", "--embedder", tmp_path,
                 "--settings", "none", setting, "--outdir", tmp_path / "out")
    one_error_line(result, f"setting {setting} takes its subject word or reference scene from a procedural prompt")
    assert not (tmp_path / "out").exists()
