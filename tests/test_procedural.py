"""Tests of the procedural scene generator and its pixel read-back metrics."""
import dataclasses
import math
import warnings

import numpy as np
import pytest

from conftest import load_script
from ldm.data.procedural import (
    ALL_KINDS, ATTRIBUTES, KINDS, ProceduralScenes, Scene, caption, caption_with_attributes,
    UNREADABLE_NOISE, consistency_score, describe, diversity_score, fidelity, legible_attributes, parse_caption,
    pixel_noise, read_attributes, render, sample_scene, vocabulary,
)


def _noisy(img, rng, sigma=10.0):
    x = img.astype(np.float64) + rng.normal(0.0, sigma, img.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


# ---------------------------------------------------------------- scenes and rendering

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_sample_scene_vocabulary(kind):
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = sample_scene(rng, kind)
        assert s.kind == kind
        assert list(s.attributes) == list(ATTRIBUTES[kind])
        for k, v in s.attributes.items():
            assert v in ATTRIBUTES[kind][k]
        if kind == "face":
            assert (s["hair_style"] == "bald") == (s["hair_colour"] == "none")
            assert s["background"] != s["shirt"]
        else:
            assert s["background"] != s["colour"]


def test_scene_is_frozen_and_hashable():
    s = sample_scene(np.random.default_rng(3), "chair")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.kind = "table"
    with pytest.raises(TypeError):
        s.attributes["colour"] = "red"
    assert hash(s) == hash(Scene(s.kind, dict(s.attributes), s.jitter))
    assert s == Scene(s.kind, dict(s.attributes), s.jitter)


@pytest.mark.parametrize("size", [32, 64])
def test_render_shape_dtype(size):
    rng = np.random.default_rng(1)
    for kind in ALL_KINDS:
        img = render(sample_scene(rng, kind), size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        assert img.std() > 10  # not a blank canvas


# ---------------------------------------------------------------- dataset

def test_dataset_deterministic_and_format():
    a = ProceduralScenes(size=32, length=1000, seed=7)
    b = ProceduralScenes(size=32, length=1000, seed=7)
    for i in (0, 1, 999):
        x, y = a[i], b[i]
        assert x["image"].dtype == np.float32 and x["image"].shape == (32, 32, 3)
        assert x["image"].min() >= -1.0 and x["image"].max() <= 1.0
        np.testing.assert_array_equal(x["image"], y["image"])
        assert x["caption"] == y["caption"] and x["kind"] == y["kind"]
    # order independence: item 5 is the same whether or not others were drawn first
    np.testing.assert_array_equal(ProceduralScenes(seed=7)[5]["image"], a[5]["image"])
    # different index / different seed -> different sample
    assert not np.array_equal(a[0]["image"], a[1]["image"])
    c = ProceduralScenes(size=32, length=1000, seed=8)
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    with pytest.raises(IndexError):
        a[1000]


def test_dataset_kinds_and_omegaconf_list():
    from omegaconf import OmegaConf
    kinds = OmegaConf.create({"k": ["chair", "table"]}).k
    ds = ProceduralScenes(size=32, length=200, seed=0, kinds=kinds)
    seen = {ds[i]["kind"] for i in range(60)}
    assert seen == {"chair", "table"}
    with pytest.raises(ValueError):
        ProceduralScenes(kinds=("sofa",))


def test_dataset_collates():
    import torch
    ds = ProceduralScenes(size=32, length=16, seed=0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == torch.float32
    assert len(batch["caption"]) == 8 and all(isinstance(c, str) for c in batch["caption"])


# ---------------------------------------------------------------- captions

def test_empty_caption_rate():
    ds = ProceduralScenes(size=32, length=2000, seed=0)
    n = 2000
    empty = sum(ds.scene(i)[1] == "" for i in range(n))
    sd = math.sqrt(n * 0.1 * 0.9)  # binomial standard deviation (~13.4)
    assert abs(empty - 0.1 * n) < 4 * sd, empty


def test_named_attributes_match_scene_and_parse_back():
    rng = np.random.default_rng(0)
    vocab = set(vocabulary())
    n_none = 0
    for _ in range(1500):
        s = sample_scene(rng, kinds=ALL_KINDS)
        text, named = caption_with_attributes(s, rng)
        if text == "":
            assert named == {}
            continue
        for k, v in named.items():
            assert s.attributes[k] == v
        parsed = parse_caption(text)
        assert parsed is not None and parsed.kind == s.kind, text
        assert dict(parsed.attributes) == named, (text, named)
        noun = s["shape"] if s.kind == "shape" else s.kind
        assert noun in text.split() or noun + "," in text.split()
        assert set(text.replace(",", "").split()) <= vocab, text
        n_none += len(named) == (1 if s.kind == "shape" else 0)
    assert n_none > 50  # object-only captions ("a chair") occur


def test_caption_examples():
    s = Scene("chair", {"colour": "red", "legs": "four", "size": "small",
                        "position": "left", "background": "blue"})
    assert describe("chair", colour="red", position="left") == "a red chair on the left"
    assert describe("table", colour="orange") == "an orange table"
    assert (describe("face", eye_colour="blue", glasses="yes")
            == "a face with blue eyes and glasses")
    assert describe("face", hair_style="bald") == "a bald face"
    assert parse_caption("a small red chair with four legs on the left, on a blue background") \
        == s
    texts = {caption(s, np.random.default_rng(i)) for i in range(200)}
    assert "" in texts and "a chair" in texts and len(texts) > 20


def test_vocabulary():
    v = vocabulary()
    assert v == sorted(set(v))
    for w in ("face", "chair", "table", "red", "glasses", "left", "bald", "background"):
        assert w in v


@pytest.mark.parametrize("kinds", [KINDS, ALL_KINDS, ("chair",)])
def test_vocabulary_is_exactly_the_words_of_the_captions(kinds):
    """Scripts warn about prompt words outside a model's training vocabulary: every caption word
    must be in it (no false warning), and every word in it must occur (none missed)."""
    dataset = ProceduralScenes(size=16, length=20000, seed=0, kinds=kinds)
    words = {word for i in range(len(dataset)) for word in dataset.scene(i)[1].replace(",", " ").split()}
    assert words == set(dataset.vocabulary()) == set(vocabulary(kinds))


# ---------------------------------------------------------------- read-back

def readback_accuracy(scenes_and_images):
    """Fraction of all attributes that read_attributes recovers from the images."""
    correct = total = 0
    for scene, image in scenes_and_images:
        read = read_attributes(image, scene.kind)
        correct += sum(read[k] == v for k, v in scene.attributes.items())
        total += len(scene.attributes)
    return correct / total


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_read_attributes_clean_renders(kind):
    # Measured: 100% of attributes (and of whole scenes) at 32 px and 64 px for every kind
    # (300 scenes each). Threshold 0.98 leaves margin for future drawing tweaks.
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, kind) for _ in range(300)]
    accuracy = readback_accuracy((s, render(s, 32)) for s in scenes)
    assert accuracy >= 0.98, accuracy


@pytest.mark.parametrize("kind", KINDS)
def test_read_attributes_noisy_and_64px(kind):
    # Gaussian pixel noise sigma=10: measured 100% for face/chair/table (99% shapes).
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng, kind) for _ in range(60)]
    accuracy = readback_accuracy((s, img) for s in scenes for img in (_noisy(render(s, 32), rng), render(s, 64)))
    assert accuracy >= 0.95, accuracy


def test_read_attributes_accepts_model_output_formats():
    import torch
    s = sample_scene(np.random.default_rng(4), "table")
    img = render(s)
    f = img.astype(np.float32) / 127.5 - 1.0
    chw = torch.from_numpy(f).permute(2, 0, 1)
    assert read_attributes(f, "table") == read_attributes(img, "table") \
        == read_attributes(chw, "table") == dict(s.attributes)


def test_read_attributes_of_an_object_two_pixels_wide_reads_one_leg():
    """No column of a 2 px box lies in its central third: its middle columns stand in (this
    used to average an empty slice, a NaN that always read as four legs)."""
    img = np.zeros((16, 16, 3), np.uint8)
    img[4:14, 7:9] = (255, 0, 0)  # a red bar, columns 7 and 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_attributes(img, "chair")["legs"] == "single"


def test_every_attribute_is_legible_at_32_px_and_at_16_px_all_but_three():
    """At 16 px a face's hair style, furniture's legs and a shape's shape are read right 64-77% of
    the time (200 renders per kind), each wrong the same way: long hair reads as short."""
    assert all(legible_attributes(kind, 32) == tuple(ATTRIBUTES[kind]) for kind in ALL_KINDS)
    assert {kind: set(ATTRIBUTES[kind]) - set(legible_attributes(kind, 16)) for kind in ALL_KINDS} == {
        "face": {"hair_style"}, "chair": {"legs"}, "table": {"legs"}, "shape": {"shape"}}
    long_hair = sample_scene(np.random.default_rng(0), "face", given={"hair_style": "long"})
    assert read_attributes(render(long_hair, 16), "face")["hair_style"] == "short"


@pytest.mark.parametrize("size", [16, 32])
def test_an_image_too_noisy_to_read_is_unknown_not_the_same_chair_as_the_others(size):
    """Pixel noise of sigma 25 still reads (pixel noise ~0.11); on pure noise the reader used to
    answer confidently and alike, so a batch of speckle agreed more than one of clean chairs."""
    rng = np.random.default_rng(1)
    scenes = [sample_scene(rng, "chair") for _ in range(8)]
    noisy = [_noisy(render(scene, size), rng, sigma=25) for scene in scenes]
    assert pixel_noise(noisy) < UNREADABLE_NOISE
    assert [read_attributes(image, "chair")["colour"] for image in noisy] == [s.attributes["colour"] for s in scenes]
    speckle = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(8)]
    assert all(set(read_attributes(image, "chair").values()) == {"unknown"} for image in speckle)
    score = consistency_score(speckle, "chair")
    assert score["agreement"] == 0.0 and math.isnan(score["colour_spread"]) and math.isnan(score["chroma_spread"])
    clean = [render(scene, size) for scene in scenes]
    mixed = consistency_score(clean[:3] + speckle[:5], "chair")
    assert mixed["colour_spread"] == consistency_score(clean[:3], "chair")["colour_spread"]  # over the readable three
    assert mixed["readable"] == 3 / 8 and score["readable"] == 0.0


def test_agreement_is_over_the_attributes_the_prompts_leave_free():
    """A batch that draws each image's named background and position exactly, against eight copies
    of one image that ignore them: the copies agree on everything, the faithful batch on its chair.
    Counting the named attributes (before) made following the prompts look inconsistent."""
    chair = {"colour": "red", "legs": "four", "size": "large"}
    scenes = [Scene("chair", {**chair, "position": position, "background": background}, (0.0, 1.0))
              for position, background in [("left", "white"), ("right", "yellow"), ("center", "green"),
                                           ("left", "black")] * 2]
    faithful = [render(scene) for scene in scenes]
    named = ("position", "background")
    score = consistency_score(faithful, "chair", named)
    assert score["agreement"] == 1.0 and set(score["per_attribute"]) == {"colour", "legs", "size"}
    assert consistency_score(faithful, "chair")["agreement"] < 0.8  # the named scenes, counted as disagreement
    copies = consistency_score([faithful[0]] * 8, "chair", named)
    assert copies["agreement"] == 1.0  # the copies' failure is fidelity's to see
    assert math.isnan(consistency_score(faithful, "chair", ATTRIBUTES["chair"])["agreement"])


def test_a_scene_drawn_with_given_attributes_keeps_the_renderers_legibility_rules():
    """The benchmark's reference scene: what a prompt names, the rest drawn. A named background
    used to override the drawn one, which could be the object's colour (an invisible chair)."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        chair = sample_scene(rng, "chair", given={"background": "white"})
        assert chair.attributes["background"] == "white" and chair.attributes["colour"] != "white"
        face = sample_scene(rng, "face", given={"shirt": "red", "hair_colour": "black"})
        assert face.attributes["background"] != "red" and face.attributes["hair_style"] != "bald"
        assert (face.attributes["shirt"], face.attributes["hair_colour"]) == ("red", "black")
    # the training data's draws, as before `given` existed (8656ef9 drew these)
    assert sample_scene(7, "table") == Scene("table", {"colour": "black", "legs": "single", "size": "large",
                                                       "position": "right", "background": "purple"}, (-0.0165, 0.976))
    assert sample_scene(11, "face") == Scene("face", {"skin": "pale", "hair_style": "short", "hair_colour": "gray",
                                                      "eye_colour": "green", "glasses": "no", "shirt": "pink",
                                                      "background": "brown"}, (0.0, 0.9578))
    assert sample_scene(3, "face", given={"hair_colour": "none"}).attributes["hair_style"] == "bald"
    for kind, given, message in (("chair", {"colour": "wooden"}, "'wooden' is not a chair's colour"),
                                 ("chair", {"wheels": "four"}, "a chair has no attribute 'wheels'"),
                                 ("face", {"hair_style": "bald", "hair_colour": "black"}, "bald exactly when")):
        with pytest.raises(ValueError, match=message):
            sample_scene(0, kind, given=given)


def test_a_caption_names_only_what_the_scenes_can_show():
    """The captioner's vocabulary: a word the renderer has no value for names nothing (it could
    neither be drawn into a reference scene nor read back for fidelity)."""
    assert parse_caption("a wooden chair on a teal background") == Scene("chair", {})
    assert parse_caption("a bald face with black hair") == Scene("face", {"hair_style": "bald"})
    assert parse_caption("a large red chair").attributes == {"size": "large", "colour": "red"}


# ---------------------------------------------------------------- batch metrics

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_consistency_and_diversity(kind):
    rng = np.random.default_rng(5)
    s = sample_scene(rng, kind)
    same = [render(s) for _ in range(8)]
    c_same = consistency_score(same, kind)
    assert c_same["agreement"] == 1.0
    assert all(v == 1.0 for v in c_same["per_attribute"].values())
    assert c_same["colour_spread"] == 0.0
    assert diversity_score(same) == 0.0

    # same attributes, different nuisance jitter: still fully consistent, but not copies
    jit = [render(dataclasses.replace(s, jitter=(0.0 if kind == "face" else dx, sh)))
           for dx, sh in zip(np.linspace(-0.03, 0.03, 8), np.linspace(0.94, 1.06, 8), strict=True)]
    c_jit = consistency_score(jit, kind)
    assert c_jit["agreement"] == 1.0
    assert 0 < c_jit["colour_spread"] < 0.1
    assert diversity_score(jit) > 0

    rnd = [render(sample_scene(rng, kind)) for _ in range(8)]
    c_rnd = consistency_score(rnd, kind)
    # measured ~0.40-0.50 agreement, ~0.5-0.8 colour spread, ~0.3-0.4 diversity
    assert c_rnd["agreement"] < 0.75
    assert c_rnd["colour_spread"] > 0.25
    assert diversity_score(rnd) > 0.15


@pytest.mark.parametrize("kind", ["chair", "table", "shape"])
def test_images_without_an_object_agree_on_nothing_but_their_background(kind):
    """Where no object is found its attributes read "unknown": not a value the images share."""
    blank = [np.full((32, 32, 3), 255, np.uint8)] * 4
    score = consistency_score(blank, kind)
    assert score["per_attribute"]["background"] == 1.0
    assert all(v == 0.0 for k, v in score["per_attribute"].items() if k != "background")
    drawn = render(sample_scene(np.random.default_rng(3), kind))
    half = consistency_score([drawn, drawn] + blank[:2], kind)["per_attribute"]
    assert half["colour"] == 0.5  # the two drawn objects agree; the empty images do not join them


def test_chroma_spread_ignores_what_only_changes_the_grey_level():
    image = render(sample_scene(np.random.default_rng(4), "chair"))
    assert image.max() <= 255 - 30  # nothing clips below
    lighter = image + np.uint8(30)  # every colour 30 grey levels up: hue and saturation unchanged
    score = consistency_score([image, lighter], "chair")
    assert score["colour_spread"] == pytest.approx(3 ** 0.5 * 30 / 255)
    assert score["chroma_spread"] == pytest.approx(0, abs=1e-9)
    darker_and_bluer = np.clip(image.astype(int) // 2 + [0, 0, 60], 0, 255).astype(np.uint8)
    assert consistency_score([image, darker_and_bluer], "chair")["chroma_spread"] > 0.1


@pytest.mark.parametrize("size", [16, 32])
def test_pixel_noise_is_zero_on_clean_renders_and_grows_with_added_noise(size):
    rng = np.random.default_rng(3)
    clean = [render(sample_scene(rng, kind), size) for kind in KINDS for _ in range(10)]
    assert pixel_noise(clean) == 0.0
    scores = []
    for sigma in (5, 10, 25):
        noisy = [np.clip(im + rng.normal(0, sigma, im.shape), 0, 255).astype(np.uint8) for im in clean]
        scores.append(pixel_noise(noisy))
    assert scores == sorted(scores)
    # measured 0.025, 0.049, 0.113 (about 1.2 x sigma in [0, 1] units)
    assert 0.8 * 25 / 255 < scores[-1] < 1.6 * 25 / 255, scores


def test_fidelity():
    s = Scene("chair", {"colour": "red", "legs": "four", "size": "small",
                        "position": "left", "background": "blue"})
    imgs = [render(s)] * 3
    assert fidelity(imgs, parse_caption("a red chair on the left")) == 1.0
    assert fidelity(imgs, "a red chair on the left") == 1.0
    assert fidelity(imgs, "a green chair on the left") == 0.5
    assert fidelity(imgs, Scene("chair", {"colour": "blue", "position": "right"})) == 0.0
    assert math.isnan(fidelity(imgs, "a chair"))
    assert math.isnan(fidelity(imgs, ""))
    # at 16 px legs are not legible: a prompt naming them is judged on what it names besides
    small = [render(s, 16)] * 3
    assert fidelity(small, "a red chair with four legs") == fidelity(small, "a red chair") == 1.0
    assert math.isnan(fidelity(small, "a chair with four legs"))


def test_subject_and_scene_split_the_per_attribute_agreement():
    from ldm.data.procedural import subject_and_scene
    per = {"colour": 1.0, "legs": 1.0, "size": 0.5, "position": 0.5, "background": 0.25}
    reads = [{"position": "left", "background": "white"}, {"position": "left", "background": "black"},
             {"position": "right", "background": "red"}, {"position": "right", "background": "blue"}]
    split = subject_and_scene({"per_attribute": per, "attributes": reads}, "chair")
    assert split["subject_agreement"] == pytest.approx(2.5 / 3)
    assert split["scene_diversity"] == pytest.approx(1 - 0.375)
    face = {"per_attribute": {"skin": 1.0, "background": 1.0}, "attributes": [{"background": "white"}] * 2}
    assert subject_and_scene(face, "face") == {"subject_agreement": 1.0, "scene_diversity": 0.0}
    named_scene = {"per_attribute": {"colour": 1.0, "size": 0.5}, "attributes": reads}  # the prompts name the rest
    split = subject_and_scene(named_scene, "chair")
    assert split["subject_agreement"] == 0.75 and math.isnan(split["scene_diversity"])


def test_scene_diversity_leaves_out_images_too_noisy_to_read():
    """Counted as disagreeing, unreadable images made a speckled batch's scene look as free as an
    unshared batch's: two alike chairs and two noise images scored 0.5, all noise 1.0."""
    from ldm.data.procedural import consistency_score, subject_and_scene
    chair = render(Scene("chair", {"colour": "red", "legs": "four", "size": "large", "position": "left",
                                   "background": "white"}))
    noise = np.random.default_rng(0).integers(0, 256, chair.shape, dtype=np.uint8)
    alike = consistency_score([chair, chair, noise, noise], "chair")
    assert alike["readable"] == 0.5 and alike["per_attribute"]["background"] == 0.5
    split = subject_and_scene(alike, "chair")
    assert split["scene_diversity"] == 0.0 and split["subject_agreement"] == 0.5
    assert math.isnan(subject_and_scene(consistency_score([noise] * 3, "chair"), "chair")["scene_diversity"])
    # one image read agrees with itself: that says nothing about the batch's scenes
    one = subject_and_scene(consistency_score([chair, noise, noise], "chair"), "chair")
    assert math.isnan(one["scene_diversity"]) and one["subject_agreement"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("size", [13, 16, 25])
def test_render_every_kind_at_small_and_odd_sizes(size):
    # size 25 rounded the face's mouth to no pixel at all and PIL refused the rectangle
    rng = np.random.default_rng(2)
    for kind in ALL_KINDS:
        for _ in range(40):
            assert render(sample_scene(rng, kind), size).shape == (size, size, 3)


# ---------------------------------------------------------------- scripts/make_procedural_samples.py

def _samples_script():
    return load_script("make_procedural_samples")


def test_samples_script_writes_a_png_and_never_overwrites_it(tmp_path, capsys):
    from PIL import Image
    script, out = _samples_script(), tmp_path / "sub" / "grid.png"
    script.main([str(out), "--n", "3", "--cols", "2", "--size", "16", "--scale", "2"])
    assert Image.open(out).size == (2 * (32 + 8), 2 * (32 + 64 + 8))
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(out), "--n", "1", "--size", "16", "--scale", "1"])
    assert exit_info.value.code == 2
    assert "never overwritten" in capsys.readouterr().err.splitlines()[-1]
    assert out.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be at least 1, got 0"),
    (["--n", "-1"], "--n must be at least 1"),
    (["--cols", "0"], "--cols must be at least 1"),
    (["--size", "0"], "--size must be at least 16"),
    (["--scale", "0"], "--scale must be at least 1"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--kinds", "dragon"], "unknown kind 'dragon'"),
    (["--kinds", "face,"], "unknown kind ''"),
])
def test_samples_script_bad_numbers_and_kinds_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        _samples_script().main([str(out), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message in err.splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("out, message", [
    ("grid.txt", "must be a .png"),
    ("grid", "must be a .png"),
    ("folder.png", "exists"),          # a folder named like a PNG
    ("afile", "must be a .png"),
    ("afile/grid.png", "is a file, not a folder"),
    ("/proc/x/grid.png", "cannot create files in this folder"),
])
def test_samples_script_bad_outputs_are_one_line_and_keep_existing_files(tmp_path, capsys, out, message):
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        _samples_script().main([str(tmp_path / out), "--n", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert message in err.splitlines()[-1]
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.png"]
