"""Layout maps of the procedural scenes (object mask, outline) and the mask read-back / IoU metric
that the adapter benchmark uses (ldm/data/procedural.py)."""
import numpy as np
import pytest

from ldm.data.procedural import (COLOURS, ProceduralScenes, condition_map, mask_iou, object_mask,
                                 read_mask, render, sample_scene)


def background_differs(scene, size=32):
    """Pixels of the colour render that are not exactly the background colour."""
    image = render(scene, size).astype(int)
    corner = image[0, 0]  # every kind leaves the top-left corner to the background
    return np.abs(image - corner).sum(-1) > 0


@pytest.mark.parametrize("kind", ["chair", "table", "shape"])
def test_object_mask_is_the_rendered_object(kind):
    """Every pixel inside the mask is mostly object, every pixel outside mostly background: the
    pixels where they differ from the background are the mask plus at most an anti-aliased rim.
    (Not for faces: blue eyes on a blue background are object pixels of the background colour.)"""
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng, kind)
        mask, touched = object_mask(scene), background_differs(scene)
        assert mask.dtype == bool and mask.shape == (32, 32) and mask.any()
        assert not (mask & ~touched).any()  # the mask never covers plain background
        rim = touched & ~mask  # partly covered edge pixels (less than half object)
        assert rim.sum() <= 0.5 * mask.sum() + 8


def test_furniture_mask_is_pixel_exact():
    """Furniture is drawn on the pixel grid: the mask is exactly where the render differs from the
    background."""
    rng = np.random.default_rng(1)
    for kind in ("chair", "table"):
        for _ in range(20):
            scene = sample_scene(rng, kind)
            assert np.array_equal(object_mask(scene), background_differs(scene))


def test_outline_is_the_inner_boundary_of_the_mask():
    scene = sample_scene(3, "table")
    mask, outline = object_mask(scene), condition_map(scene, "outline")
    assert outline.dtype == np.float32 and set(np.unique(outline)) == {0.0, 1.0}
    assert np.array_equal(condition_map(scene, "mask"), mask.astype(np.float32))
    lines = outline.astype(bool)
    assert not (lines & ~mask).any() and lines.sum() < mask.sum()
    interior = mask & ~lines
    ys, xs = np.nonzero(interior)  # interior pixels have all four neighbours in the mask
    assert all(mask[y - 1, x] and mask[y + 1, x] and mask[y, x - 1] and mask[y, x + 1]
               for y, x in zip(ys, xs, strict=True))
    ys, xs = np.nonzero(lines)  # every outline pixel touches the outside
    assert all(not (mask[y - 1, x] and mask[y + 1, x] and mask[y, x - 1] and mask[y, x + 1])
               for y, x in zip(ys, xs, strict=True))


def test_face_mask_covers_head_and_shirt_not_the_corners():
    for seed in range(10):
        mask = object_mask(sample_scene(seed, "face"))
        assert mask[14:20, 12:20].all() and mask[-1, 8:24].all()  # head centre, shirt
        assert not mask[:3, :3].any() and not mask[:3, -3:].any()


def test_face_outline_ignores_the_image_border():
    face = sample_scene(0, "face")
    outline = condition_map(face, "outline")
    assert object_mask(face)[-1].any()  # the shirt runs off the bottom edge ...
    assert outline[-1].sum() < object_mask(face)[-1].sum()  # ... which is not drawn as a line


def test_unknown_condition_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown condition kind 'edges'"):
        condition_map(sample_scene(0, "chair"), "edges")
    with pytest.raises(ValueError, match="unknown condition 'edges'"):
        ProceduralScenes(condition="edges")


def test_iou_of_known_masks():
    a = np.zeros((8, 8), bool)
    a[2:6, 2:6] = True
    b = np.zeros((8, 8), bool)
    b[0:2, 0:2] = True
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == 0.0
    half = np.zeros((8, 8), bool)
    half[2:6, 2:4] = True
    assert mask_iou(a, half) == 0.5
    assert mask_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0  # both empty: they agree
    with pytest.raises(ValueError, match="different shapes"):
        mask_iou(a, a[:4])


@pytest.mark.parametrize("kind", ["chair", "table", "shape"])
@pytest.mark.parametrize("size", [32, 64])
def test_mask_read_back_from_rendered_pixels_matches_the_renderer(kind, size):
    rng = np.random.default_rng(2)
    ious = []
    for _ in range(30):
        scene = sample_scene(rng, kind)
        image = render(scene, size)
        ious.append(mask_iou(read_mask(image, kind), object_mask(scene, size)))
        noisy = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        ious.append(mask_iou(read_mask(noisy, kind), object_mask(scene, size)))
    assert min(ious) > 0.9, min(ious)
    # model outputs come as floats in [-1, 1]
    float_image = render(scene, size).astype(np.float32) / 127.5 - 1.0
    assert mask_iou(read_mask(float_image, kind), object_mask(scene, size)) == 1.0


def test_read_mask_of_a_plain_background_is_empty_and_faces_are_refused():
    plain = np.zeros((32, 32, 3), np.uint8) + np.array(COLOURS["green"], np.uint8)
    assert not read_mask(plain, "chair").any()
    with pytest.raises(ValueError, match="faces have a fixed layout"):
        read_mask(render(sample_scene(0, "face")), "face")


def test_dataset_with_condition_keeps_scenes_and_adds_the_map():
    plain, conditioned = ProceduralScenes(length=8, seed=5), ProceduralScenes(length=8, seed=5, condition="outline")
    for i in range(8):
        a, b = plain[i], conditioned[i]
        assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
        scene = conditioned.scene(i)[0]
        assert b["cond"].shape == (1, 32, 32) and b["cond"].dtype == np.float32
        assert np.array_equal(b["cond"][0], condition_map(scene, "outline"))
        assert "cond" not in a
