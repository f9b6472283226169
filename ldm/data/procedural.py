"""Procedural text-to-image data: small flat-colour scenes of faces, chairs and tables.

Stable Diffusion weights cannot be downloaded in this project, so a small text-to-image
model is trained from scratch on these scenes and the "consistent self-attention" work is
benchmarked on it. This module provides both sides of that:

* generation: ``sample_scene`` draws a :class:`Scene` (an object kind plus a dict of
  discrete attributes), ``render`` draws it (numpy + PIL only, deterministic),
  ``caption`` names the object and a random subset of its attributes in short English,
  and :class:`ProceduralScenes` is a torch ``Dataset`` returning
  ``{"image": float32 HxWx3 in [-1, 1], "caption": str, "kind": str}`` for the
  LatentDiffusion training loop (``first_stage_key: image``, ``cond_stage_key: caption``).
* measurement without a classifier: ``read_attributes`` reads every attribute back from
  the pixels of an image (clean render or model sample) using the known scene layout;
  ``consistency_score``, ``diversity_score`` and ``fidelity`` build on it.

Design choices that make attributes readable at 32x32: large areas of flat colour, a
colour vocabulary of well separated named colours (every attribute is read as the
nearest vocabulary colour of the median pixel of a region), faces drawn at a fixed
layout (so their parts are at known places) and furniture/shapes on a uniform
background (so they can be segmented by their difference to the background colour).

Unnamed attributes vary freely; in addition every scene has a small continuous jitter
(horizontal offset for furniture/shapes, a global brightness factor for all kinds). Rendered, it
moves furniture by a pixel or two and colours by a few levels, so scenes with the same
attributes are often pixel-identical, and another seed's draws (the validation split) are often
images the training draws hold too (models/embedded/README.md measures how often).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

try:  # torch is only needed for the Dataset class
    from torch.utils.data import Dataset
except Exception:  # pragma: no cover
    Dataset = object

__all__ = [
    "KINDS", "ALL_KINDS", "COLOURS", "SKIN", "HAIR", "EYES", "ATTRIBUTES",
    "Scene", "sample_scene", "render", "caption", "caption_with_attributes",
    "parse_caption", "vocabulary", "read_attributes", "consistency_score",
    "diversity_score", "fidelity", "SCENE_ATTRIBUTES", "subject_and_scene", "ProceduralScenes",
    "object_mask", "condition_map", "CONDITION_KINDS", "read_mask", "mask_iou", "legible_attributes",
    "UNREADABLE_NOISE",
]

# ----------------------------------------------------------------------------------------
# vocabularies
# ----------------------------------------------------------------------------------------

#: general colours (object colour, shirt, background). Minimum pairwise RGB distance ~88.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 55, 175),
    "pink": (245, 140, 200),
    "brown": (120, 70, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
#: skin tones of faces (chosen far from every hair colour)
SKIN: dict[str, tuple[int, int, int]] = {
    "pale": (250, 220, 190),
    "tan": (210, 155, 105),
    "dark": (105, 65, 40),
}
#: hair colours ("none" for bald faces is not drawn)
HAIR: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "blond": (250, 225, 90),
    "red": (190, 50, 25),
    "gray": (140, 140, 140),
    "blue": (35, 75, 215),
}
EYES: dict[str, tuple[int, int, int]] = {
    "blue": (35, 75, 215),
    "green": (40, 160, 60),
    "brown": (110, 60, 25),
}
GLASSES_COLOUR = (20, 20, 20)
MOUTH_COLOUR = (160, 40, 50)

KINDS = ("face", "chair", "table")
ALL_KINDS = ("face", "chair", "table", "shape")

#: attribute name -> vocabulary, per kind (order = canonical order)
ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "face": {
        "skin": tuple(SKIN),
        "hair_style": ("short", "long", "bald"),
        "hair_colour": tuple(HAIR) + ("none",),
        "eye_colour": tuple(EYES),
        "glasses": ("yes", "no"),
        "shirt": tuple(COLOURS),
        "background": tuple(COLOURS),
    },
    "chair": {
        "colour": tuple(COLOURS),
        "legs": ("four", "single"),
        "size": ("small", "large"),
        "position": ("left", "center", "right"),
        "background": tuple(COLOURS),
    },
    "table": {
        "colour": tuple(COLOURS),
        "legs": ("four", "single"),
        "size": ("small", "large"),
        "position": ("left", "center", "right"),
        "background": tuple(COLOURS),
    },
    "shape": {
        "shape": ("circle", "square", "triangle"),
        "colour": tuple(COLOURS),
        "size": ("small", "large"),
        "position": ("left", "center", "right"),
        "background": tuple(COLOURS),
    },
}

#: attributes of the scene around the object rather than of the object itself, per kind: what
#: subject-masked sharing should leave free to vary while the object's own attributes agree
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "face": ("background",),
    "chair": ("background", "position"),
    "table": ("background", "position"),
    "shape": ("background", "position"),
}

_POS_X = {"left": 0.27, "center": 0.5, "right": 0.73}
# bounding box (width, height) as fractions of the image size
_FURNITURE_BOX = {
    ("chair", "large"): (0.30, 0.72), ("chair", "small"): (0.22, 0.45),
    ("table", "large"): (0.46, 0.46), ("table", "small"): (0.32, 0.28),
    ("shape", "large"): (0.44, 0.44), ("shape", "small"): (0.26, 0.26),
}
_FLOOR = 0.92          # bottom of furniture, fraction of the height
_SHAPE_CY = 0.55       # vertical centre of shapes
_MAX_DX = 0.03         # horizontal jitter of furniture/shapes (fraction of the width)
_SHADE = 0.06          # brightness jitter: colours are multiplied by 1 +- _SHADE
_SS = 4                # supersampling factor of the renderer (anti-aliased edges)


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


# ----------------------------------------------------------------------------------------
# scenes
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scene:
    """One scene: the object ``kind`` and its discrete ``attributes`` (name -> value).

    ``jitter`` = (dx, shade) is the continuous nuisance variation: dx shifts furniture and
    shapes horizontally (fraction of the width), shade multiplies every colour. A Scene
    may also hold only a subset of the attributes (e.g. the attributes a prompt names, see
    :func:`parse_caption` and :func:`fidelity`); it is immutable and hashable.
    """
    kind: str
    attributes: Mapping[str, str]
    jitter: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        object.__setattr__(self, "attributes", MappingProxyType(dict(self.attributes)))
        object.__setattr__(self, "jitter", tuple(float(v) for v in self.jitter))

    def __hash__(self):
        return hash((self.kind, tuple(sorted(self.attributes.items())), self.jitter))

    def __eq__(self, other):
        if not isinstance(other, Scene):
            return NotImplemented
        return (self.kind == other.kind and dict(self.attributes) == dict(other.attributes)
                and self.jitter == other.jitter)

    def __getitem__(self, key: str) -> str:
        return self.attributes[key]


def _choice(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(rng: np.random.Generator | int | None = None, kind: str | None = None,
                 kinds: Sequence[str] = KINDS, given: Mapping[str, str] | None = None) -> Scene:
    """Draw a random scene (uniform over the vocabularies, with legibility constraints).

    ``kind`` fixes the object kind; otherwise it is drawn uniformly from ``kinds``.
    ``given`` fixes some attributes (what a prompt names); the others are drawn under the
    constraints with them. Constraints: the background differs from the object colour
    (furniture/shapes) and from the shirt and hair colour (faces), so objects stay visible
    and readable. Without ``given`` the draws are those of the training data.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    kind = kind if kind is not None else _choice(rng, tuple(kinds))
    if kind not in ATTRIBUTES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {ALL_KINDS}")
    given = _check_given(kind, given or {})
    pick = lambda name, options: given[name] if name in given else _choice(rng, tuple(options))
    background = given.get("background")  # a given background constrains the draws before it
    a: dict[str, str] = {}
    if kind == "face":
        a["skin"] = pick("skin", SKIN)
        hair_colour = given.get("hair_colour")
        a["hair_style"] = pick("hair_style", ("short", "long", "bald") if hair_colour is None
                               else ("bald",) if hair_colour == "none" else ("short", "long"))
        a["hair_colour"] = "none" if a["hair_style"] == "bald" else pick(
            "hair_colour", [h for h in HAIR if background is None or _dist(COLOURS[background], HAIR[h]) > 60])
        a["eye_colour"] = pick("eye_colour", EYES)
        a["glasses"] = pick("glasses", ("yes", "no"))
        a["shirt"] = pick("shirt", [c for c in COLOURS if c != background])
        hair_rgb = HAIR.get(a["hair_colour"])
        a["background"] = pick("background", [c for c in COLOURS if c != a["shirt"]
                                              and (hair_rgb is None or _dist(COLOURS[c], hair_rgb) > 60)])
        dx = 0.0
    else:
        if kind == "shape":
            a["shape"] = pick("shape", ("circle", "square", "triangle"))
        a["colour"] = pick("colour", [c for c in COLOURS if c != background])
        if kind != "shape":
            a["legs"] = pick("legs", ("four", "single"))
        a["size"] = pick("size", ("small", "large"))
        a["position"] = pick("position", ("left", "center", "right"))
        a["background"] = pick("background", [c for c in COLOURS if c != a["colour"]])
        dx = float(rng.uniform(-_MAX_DX, _MAX_DX))
    shade = float(rng.uniform(1 - _SHADE, 1 + _SHADE))
    # canonical attribute order
    a = {k: a[k] for k in ATTRIBUTES[kind]}
    return Scene(kind, a, (round(dx, 4), round(shade, 4)))


def _check_given(kind: str, given: Mapping[str, str]) -> dict[str, str]:
    """`given` as a dict, refused (ValueError) where it names an attribute or value a `kind` scene
    does not have, or a bald face with a hair colour (:func:`parse_caption` gives none such)."""
    for name, value in given.items():
        if name not in ATTRIBUTES[kind]:
            raise ValueError(f"a {kind} has no attribute {name!r} (it has {', '.join(ATTRIBUTES[kind])})")
        if value not in ATTRIBUTES[kind][name]:
            raise ValueError(f"{value!r} is not a {kind}'s {name} (one of {', '.join(ATTRIBUTES[kind][name])})")
    styled = {"hair_style", "hair_colour"} <= given.keys()
    if styled and (given["hair_style"] == "bald") != (given["hair_colour"] == "none"):
        raise ValueError(f"a face is bald exactly when its hair colour is none, got {dict(given)}")
    return dict(given)


# ----------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------

def _shade(rgb, s):
    return tuple(int(min(255, max(0, round(c * s)))) for c in rgb)


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Draw ``scene`` as a ``size`` x ``size`` RGB uint8 array (deterministic).

    Drawn with PIL at ``4 * size`` and box-downsampled, so edges are anti-aliased while
    the interiors of all parts are flat colour.
    """
    shade = scene.jitter[1]
    bg = _shade(COLOURS[scene.attributes["background"]], shade)
    S = int(size) * _SS
    img = _draw(scene, size, Image.new("RGB", (S, S), bg), lambda rgb: _shade(rgb, shade))
    return np.asarray(img.reduce(_SS), dtype=np.uint8)


#: layout maps for T2I-Adapter training (condition_map)
CONDITION_KINDS = ("outline", "mask")


def object_mask(scene: Scene, size: int = 32) -> np.ndarray:
    """Exact (H, W) bool mask of the pixels the object covers (everything but the background;
    for faces head, hair, neck and shirt), from the same drawing code as :func:`render`.

    The parts are drawn white on black at the supersampled size, so after the box
    downsampling a pixel's value is its coverage; a pixel belongs to the object when more
    than half of it is covered (the rule :func:`read_mask` applies to the colour render)."""
    S = int(size) * _SS
    img = _draw(scene, size, Image.new("L", (S, S), 0), lambda rgb: 255)
    return np.asarray(img.reduce(_SS)) > 128


def condition_map(scene: Scene, kind: str = "outline", size: int = 32) -> np.ndarray:
    """(H, W) float32 map in {0, 1} of the scene's layout, for T2I-Adapter training:

    * ``"mask"``: the filled object mask (:func:`object_mask`);
    * ``"outline"``: its one-pixel inner boundary (white lines on black, what the ``sketch``
      condition type of scripts/txt2img.py reads). The image border does not count as
      boundary, so a shirt running off the bottom edge is not outlined there.
    """
    if kind not in CONDITION_KINDS:
        raise ValueError(f"unknown condition kind {kind!r}; expected one of {CONDITION_KINDS}")
    mask = object_mask(scene, size)
    if kind == "outline":
        p = np.pad(mask, 1, mode="edge")
        interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        mask = mask & ~interior
    return mask.astype(np.float32)


def _draw(scene: Scene, size: int, img: Image.Image, paint) -> Image.Image:
    """Draw the scene's parts onto ``img`` (``4 * size`` square, background already filled)
    and return it. ``paint(rgb)`` turns a part's vocabulary colour into the fill value, so
    the colour render and the mask share one geometry."""
    size = int(size)
    S = size * _SS
    dx = scene.jitter[0]
    a = scene.attributes
    d = ImageDraw.Draw(img)

    def box(x0, y0, x1, y1):  # fractions -> canvas pixels, snapped to the target grid
        c0, r0 = round(x0 * size), round(y0 * size)
        # at least one target pixel: a thin part (the mouth) rounded to none at some sizes (25)
        # and PIL refused the inverted rectangle
        return [c0 * _SS, r0 * _SS, max(round(x1 * size), c0 + 1) * _SS - 1, max(round(y1 * size), r0 + 1) * _SS - 1]

    def fbox(x0, y0, x1, y1):  # fractions -> canvas pixels, sub-pixel precision
        return [x0 * S, y0 * S, x1 * S - 1, y1 * S - 1]

    if scene.kind == "face":
        skin = paint(SKIN[a["skin"]])
        style = a["hair_style"]
        hair = paint(HAIR[a["hair_colour"]]) if style != "bald" else None
        if style == "long":
            d.rounded_rectangle(box(0.16, 0.13, 0.84, 0.82), radius=0.14 * S, fill=hair)
        d.ellipse(fbox(0.10, 0.80, 0.90, 1.30), fill=paint(COLOURS[a["shirt"]]))
        d.rectangle(box(0.41, 0.66, 0.59, 0.84), fill=skin)                 # neck
        d.ellipse(fbox(0.26, 0.16, 0.74, 0.74), fill=skin)                  # head
        if hair is not None:                                                # hair cap
            d.pieslice(fbox(0.24, 0.11, 0.76, 0.61), 180, 360, fill=hair)
        eye = paint(EYES[a["eye_colour"]])
        d.ellipse(fbox(0.33, 0.41, 0.45, 0.52), fill=eye)
        d.ellipse(fbox(0.55, 0.41, 0.67, 0.52), fill=eye)
        d.rectangle(box(0.42, 0.62, 0.58, 0.66), fill=paint(MOUTH_COLOUR))
        if a["glasses"] == "yes":
            g = paint(GLASSES_COLOUR)
            w = max(1, round(size / 32)) * _SS
            d.rectangle(box(0.30, 0.38, 0.48, 0.56), outline=g, width=w)
            d.rectangle(box(0.52, 0.38, 0.70, 0.56), outline=g, width=w)
            d.rectangle(box(0.47, 0.43, 0.53, 0.49), fill=g)                 # bridge
    else:
        col = paint(COLOURS[a["colour"]])
        bw, bh = _FURNITURE_BOX[(scene.kind, a["size"])]
        cx = _POS_X[a["position"]] + dx
        x0, x1 = cx - bw / 2, cx + bw / 2
        if scene.kind == "shape":
            y0, y1 = _SHAPE_CY - bh / 2, _SHAPE_CY + bh / 2
            if a["shape"] == "circle":
                d.ellipse(fbox(x0, y0, x1, y1), fill=col)
            elif a["shape"] == "square":
                d.rectangle(fbox(x0, y0, x1, y1), fill=col)
            else:
                d.polygon([(x0 * S, y1 * S), (x1 * S, y1 * S), (cx * S, y0 * S)], fill=col)
        else:
            y1 = _FLOOR
            y0 = y1 - bh
            # furniture is snapped to the target pixel grid: flat parts >= 2 px thick
            X0, W = round(x0 * size), round(bw * size)
            Y1, H = round(_FLOOR * size), round(bh * size)
            Y0 = Y1 - H
            t = max(2, round(0.06 * size))                                  # leg thickness

            def px(c0, r0, c1, r1):                # target pixels, end exclusive
                d.rectangle([c0 * _SS, r0 * _SS, c1 * _SS - 1, r1 * _SS - 1], fill=col)

            if scene.kind == "chair":
                seat0 = Y0 + round(0.5 * H)
                seat1 = seat0 + max(t, round(0.11 * H))
                px(X0, Y0, X0 + t, seat0)                                   # backrest
                px(X0, seat0, X0 + W, seat1)                                # seat
                leg_top, feet = seat1, (X0, X0 + W - t)
            else:
                top1 = Y0 + max(t + 1, round(0.16 * H))
                px(X0, Y0, X0 + W, top1)                                    # table top
                inset = round(0.05 * W)
                leg_top, feet = top1, (X0 + inset, X0 + W - inset - t)
            if a["legs"] == "four":
                for c in feet:
                    px(c, leg_top, c + t, Y1)
            else:
                c = X0 + (W - t) // 2
                px(c, leg_top, c + t, Y1)                                   # pedestal
                f = round(0.18 * W)
                px(X0 + f, Y1 - max(1, round(size / 32)), X0 + W - f, Y1)   # its foot
    return img


# ----------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------

_POS_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}
_LEG_PHRASE = {"four": "with four legs", "single": "with a single leg"}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _namable(scene: Scene) -> list[str]:
    a = scene.attributes
    names = [k for k in ATTRIBUTES[scene.kind] if k in a]
    if scene.kind == "face" and a.get("hair_colour") == "none":
        names.remove("hair_colour")
    if scene.kind == "shape":
        names.remove("shape")   # always named: it is the object word
    return names


def _phrase(kind: str, named: Mapping[str, str]) -> str:
    """Caption text naming exactly the attributes in ``named``."""
    if kind == "face":
        pre = "bald face" if named.get("hair_style") == "bald" else "face"
        withs = []
        if "skin" in named:
            withs.append(f"{named['skin']} skin")
        style = named.get("hair_style") if named.get("hair_style") != "bald" else None
        hc = named.get("hair_colour")
        if style or hc:
            withs.append(" ".join(w for w in (style, hc) if w) + " hair")
        if "eye_colour" in named:
            withs.append(f"{named['eye_colour']} eyes")
        if "glasses" in named:
            withs.append("glasses" if named["glasses"] == "yes" else "no glasses")
        text = f"a {pre}"
        if withs:
            text += " with " + _join(withs)
        if "shirt" in named:
            text += f", wearing {_article(named['shirt'])} {named['shirt']} shirt"
    else:
        noun = named["shape"] if kind == "shape" else kind
        adjs = [named[k] for k in ("size", "colour") if k in named]
        words = adjs + [noun]
        text = f"{_article(words[0])} " + " ".join(words)
        if "legs" in named:
            text += " " + _LEG_PHRASE[named["legs"]]
        if "position" in named:
            text += " " + _POS_PHRASE[named["position"]]
    if "background" in named:
        text += f", on {_article(named['background'])} {named['background']} background"
    return text


def caption_with_attributes(scene: Scene, rng: np.random.Generator | int | None = None,
                            p_empty: float = 0.1) -> tuple[str, dict[str, str]]:
    """Caption ``scene`` and return ``(text, named)``: the attributes the text names.

    With probability ``p_empty`` the caption is "" (for classifier-free guidance
    training) and ``named`` is empty. Otherwise the number of named attributes is uniform
    in 0..n (so "a chair" alone is common) and which ones is a random subset; the object
    word is always present. Unnamed attributes vary freely in the data.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if rng.random() < p_empty:
        return "", {}
    names = _namable(scene)
    k = int(rng.integers(len(names) + 1))
    chosen = set(rng.permutation(len(names))[:k].tolist())
    named = {n: scene.attributes[n] for i, n in enumerate(names) if i in chosen}
    if scene.kind == "shape":
        named["shape"] = scene.attributes["shape"]
    named = {n: named[n] for n in ATTRIBUTES[scene.kind] if n in named}
    return _phrase(scene.kind, named), named


def caption(scene: Scene, rng: np.random.Generator | int | None = None,
            p_empty: float = 0.1) -> str:
    """Short English caption of ``scene`` naming a random subset of attributes (see
    :func:`caption_with_attributes`); "" with probability ``p_empty``."""
    return caption_with_attributes(scene, rng, p_empty)[0]


def describe(kind: str, **attributes: str) -> str:
    """Caption naming exactly the given attributes, e.g. for benchmark prompts:
    ``describe("chair", colour="red", position="left") == "a red chair on the left"``."""
    for k, v in attributes.items():
        if v not in ATTRIBUTES[kind].get(k, ()):
            raise ValueError(f"bad attribute {k}={v!r} for {kind}")
    named = {n: attributes[n] for n in ATTRIBUTES[kind] if n in attributes}
    if kind == "shape" and "shape" not in named:
        raise ValueError("a shape prompt must name the shape")
    return _phrase(kind, named)


_SHAPE_WORDS = ("circle", "square", "triangle")


def parse_caption(text: str) -> Scene | None:
    """Inverse of the captioner: the kind and the attributes named in ``text``.

    Returns a partial :class:`Scene` (only named attributes) or None for "" / unknown text.
    Works on any caption this module produces (and :func:`describe` prompts). A word this world has
    no value for ("a wooden chair", "a teal table") names nothing: no scene can show it, no reader
    can check it. A bald face's hair colour is left out, as the captioner leaves it out.
    """
    t = text.strip().lower()
    m = re.match(r"^an? (?:(bald) )?face\b", t)
    if m:
        a: dict[str, str] = {}
        if m.group(1):
            a["hair_style"] = "bald"
        if mm := re.search(r"\b(\w+) skin\b", t):
            a["skin"] = mm.group(1)
        if mm := re.search(r"\b((?:short|long) )?((?:%s) )?hair\b"
                           % "|".join(HAIR), t):
            if mm.group(1):
                a["hair_style"] = mm.group(1).strip()
            if mm.group(2):
                a["hair_colour"] = mm.group(2).strip()
        if mm := re.search(r"\b(\w+) eyes\b", t):
            a["eye_colour"] = mm.group(1)
        if re.search(r"\bno glasses\b", t):
            a["glasses"] = "no"
        elif re.search(r"\bglasses\b", t):
            a["glasses"] = "yes"
        if mm := re.search(r"wearing an? (\w+) shirt", t):
            a["shirt"] = mm.group(1)
        kind = "face"
    else:
        m = re.match(r"^an? (?:(small|large) )?(?:(\w+) )?(chair|table|%s)\b"
                     % "|".join(_SHAPE_WORDS), t)
        if not m:
            return None
        a = {}
        noun = m.group(3)
        kind = "shape" if noun in _SHAPE_WORDS else noun
        if kind == "shape":
            a["shape"] = noun
        if m.group(1):
            a["size"] = m.group(1)
        if m.group(2):
            a["colour"] = m.group(2)
        for v, p in _LEG_PHRASE.items():
            if p in t:
                a["legs"] = v
        for v, p in _POS_PHRASE.items():
            if p in t:
                a["position"] = v
    if mm := re.search(r"on an? (\w+) background", t):
        a["background"] = mm.group(1)
    if a.get("hair_style") == "bald":
        a.pop("hair_colour", None)
    a = {n: a[n] for n, values in ATTRIBUTES[kind].items() if a.get(n) in values}
    return Scene(kind, a)


def vocabulary(kinds: Sequence[str] = ALL_KINDS) -> list[str]:
    """Sorted list of every word a caption of these kinds can contain (punctuation stripped): all
    a text encoder trained on them has seen. Read off the captioner itself, one phrase per attribute
    value plus one naming every attribute (for the joining words), so it cannot drift from it."""
    words = set()
    for kind in kinds:
        namable = {name: [v for v in values if v != "none"] for name, values in ATTRIBUTES[kind].items()}
        noun = {"shape": namable["shape"][0]} if kind == "shape" else {}  # a shape caption always names one
        phrases = [_phrase(kind, {**noun, name: v}) for name, values in namable.items() for v in values]
        phrases.append(_phrase(kind, {name: values[0] for name, values in namable.items()}))
        words.update(word for phrase in phrases for word in phrase.replace(",", " ").split())
    return sorted(words)


# ----------------------------------------------------------------------------------------
# reading attributes back from pixels
# ----------------------------------------------------------------------------------------

def _to_uint8(image) -> np.ndarray:
    """HxWx3 array (uint8 0..255, or float in [-1, 1]) or CxHxW torch tensor -> uint8."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    x = np.asarray(image)
    if x.ndim == 3 and x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)
    if x.dtype != np.uint8:
        x = np.clip((x.astype(np.float64) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return x


def _nearest(rgb, vocab: Mapping[str, tuple[int, int, int]]) -> str:
    names = list(vocab)
    pal = np.asarray([vocab[n] for n in names], np.float64)
    return names[int(np.argmin(((pal - np.asarray(rgb, np.float64)) ** 2).sum(-1)))]


def _region(img: np.ndarray, x0, y0, x1, y1) -> np.ndarray:
    """Pixels of a region given in fractions; at least one pixel wide/high."""
    H, W = img.shape[:2]
    c0, r0 = int(np.floor(x0 * W)), int(np.floor(y0 * H))
    c1, r1 = max(c0 + 1, int(np.ceil(x1 * W))), max(r0 + 1, int(np.ceil(y1 * H)))
    return img[r0:r1, c0:c1].reshape(-1, 3).astype(np.float64)


def _median(*regions) -> np.ndarray:
    return np.median(np.concatenate(regions, 0), axis=0)


# Face regions (fractions), placed with margin inside the parts they sample.
_FACE_REGIONS = {
    "background": [(0.0, 0.0, 0.12, 0.30), (0.88, 0.0, 1.0, 0.30)],
    "skin": [(0.33, 0.57, 0.40, 0.61), (0.60, 0.57, 0.67, 0.61), (0.44, 0.69, 0.56, 0.78)],
    "hair_top": [(0.40, 0.20, 0.60, 0.28)],
    "hair_side": [(0.18, 0.56, 0.24, 0.75), (0.76, 0.56, 0.82, 0.75)],
    "eyes": [(0.37, 0.45, 0.41, 0.48), (0.59, 0.45, 0.63, 0.48)],
    "glasses": [(0.47, 0.44, 0.53, 0.48), (0.34, 0.38, 0.44, 0.40), (0.56, 0.38, 0.66, 0.40)],
    "shirt": [(0.30, 0.90, 0.70, 1.0)],
}


def _face_colours(img: np.ndarray) -> dict[str, np.ndarray]:
    return {k: _median(*[_region(img, *r) for r in rs]) for k, rs in _FACE_REGIONS.items()}


def _read_face(img: np.ndarray) -> dict[str, str]:
    c = _face_colours(img)
    out = {"skin": _nearest(c["skin"], SKIN)}
    skin_rgb = c["skin"]
    # bald if the top of the head is nearer to the (measured) skin than to any hair colour
    top = dict(HAIR)
    top["__skin__"] = tuple(skin_rgb)
    hair = _nearest(c["hair_top"], top)
    if hair == "__skin__":
        out["hair_style"], out["hair_colour"] = "bald", "none"
    else:
        side_is_hair = _dist(c["hair_side"], c["hair_top"]) < _dist(c["hair_side"],
                                                                    c["background"])
        out["hair_style"] = "long" if side_is_hair else "short"
        out["hair_colour"] = hair
    out["eye_colour"] = _nearest(c["eyes"], EYES)
    # glasses: frame pixels darker than the skin by > 40% of the skin-to-frame distance
    # (not "nearest of the two": blur lightens the thin frame lines)
    out["glasses"] = ("yes" if _dist(c["glasses"], skin_rgb) > 0.4 * _dist(GLASSES_COLOUR, skin_rgb)
                      else "no")
    out["shirt"] = _nearest(c["shirt"], COLOURS)
    out["background"] = _nearest(c["background"], COLOURS)
    return {k: out[k] for k in ATTRIBUTES["face"]}


def _box3(x: np.ndarray) -> np.ndarray:
    """3x3 box filter (edge padded) of an HxWxC float array."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    H, W = x.shape[:2]
    return sum(p[i:i + H, j:j + W] for i in range(3) for j in range(3)) / 9.0


def _segment(img: np.ndarray):
    """(background rgb, boolean object mask) for furniture/shape scenes.

    Background = median of the top rows (no object reaches them). The object colour is
    the median of the pixels clearly different from it (> 60 RGB units, and > 40 after a
    3x3 box filter, which rejects isolated noisy pixels); the mask is every pixel of the box-filtered image nearer to the object colour
    than to the background. The box filter makes this robust to pixel noise while keeping
    2-pixel legs (they stay > half object colour).
    """
    x = img.astype(np.float64)
    rows = max(1, img.shape[0] // 16)
    bg = np.median(x[:rows].reshape(-1, 3), axis=0)
    sm = _box3(x)
    d_bg = np.linalg.norm(sm - bg, axis=-1)
    far = (d_bg > 40.0) & (np.linalg.norm(x - bg, axis=-1) > 60.0)
    if far.sum() < 4:
        return bg, np.zeros(img.shape[:2], bool)
    obj = np.median(x[far], axis=0)
    mask = np.linalg.norm(sm - obj, axis=-1) < d_bg
    return bg, mask


def read_mask(image, kind: str) -> np.ndarray:
    """(H, W) bool mask of the object, read back from the pixels of a chair, table or shape
    scene (clean render or model sample): background and object colour as
    :func:`read_attributes` reads them (see ``_segment``), then every pixel more than half
    of the way from the background to the object colour. Equals :func:`object_mask` on clean
    renders of every chair, table and shape at 32 and 64 px (300 scenes per kind, seed 1;
    with pixel noise sigma 10, mean IoU >= 0.98). Compare masks with :func:`mask_iou`.

    Faces are refused: their parts have several colours, some as close to a background
    colour as dark skin to brown (distance ~19), so no one threshold separates them, and
    the face layout is nearly fixed anyway (only the hair style changes the silhouette)."""
    if kind == "face":
        raise ValueError("read_mask reads chair, table and shape scenes; faces have a fixed layout and "
                         "several part colours, so their mask is not read back")
    if kind not in ATTRIBUTES:
        raise ValueError(f"unknown kind {kind!r}; expected one of {ALL_KINDS}")
    img = _to_uint8(image)
    bg, rough = _segment(img)
    if rough.sum() < 4:
        return np.zeros(img.shape[:2], bool)
    # _segment's 3x3 box filter (robust colour estimates on noisy samples) rounds the mask's
    # corners and leg ends off, so the mask itself is made per pixel: its coverage is its
    # position on the line from the background to the object colour (an anti-aliased edge
    # pixel is that linear mix). More than half covered is object, as in object_mask; the
    # margin of half a coverage step (1/32 of 4x4 subpixels) keeps exactly-half pixels out
    # although rounding the mix to uint8 puts them a hair to either side.
    obj = np.median(_core(img, bg, rough), axis=0)
    axis = obj - bg
    coverage = (img.astype(np.float64) - bg) @ axis / max(float(axis @ axis), 1e-9)
    return coverage > 0.5 + 0.5 / _SS ** 2


def mask_iou(a, b) -> float:
    """Intersection over union of two boolean masks of the same shape; 1.0 when both are empty
    (they agree that there is nothing)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes {a.shape} and {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def _core(img: np.ndarray, bg: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Object pixels least mixed with the background (anti-aliased or blurred edges): the
    half of the mask farthest from the background colour."""
    x = img.astype(np.float64)[mask]
    d = np.linalg.norm(x - bg, axis=-1)
    return x[d >= np.quantile(d, 0.5)]


def _bbox(mask: np.ndarray, q: float = 0.01):
    ys, xs = np.nonzero(mask)
    x0, x1 = np.quantile(xs, [q, 1 - q])
    y0, y1 = np.quantile(ys, [q, 1 - q])
    return float(x0), float(y0), float(x1) + 1, float(y1) + 1


def _read_object(img: np.ndarray, kind: str) -> dict[str, str]:
    H, W = img.shape[:2]
    bg, mask = _segment(img)
    out = {"background": _nearest(bg, COLOURS)}
    if mask.sum() < 4:      # nothing there: unreadable
        out.update({k: "unknown" for k in ATTRIBUTES[kind] if k != "background"})
        return {k: out[k] for k in ATTRIBUTES[kind]}
    x0, y0, x1, y1 = _bbox(mask)
    out["colour"] = _nearest(np.median(_core(img, bg, mask), axis=0), COLOURS)
    cx = (x0 + x1) / 2 / W
    out["position"] = min(_POS_X, key=lambda p: abs(_POS_X[p] - cx))
    bh = (y1 - y0) / H
    small, large = _FURNITURE_BOX[(kind, "small")], _FURNITURE_BOX[(kind, "large")]
    out["size"] = "large" if bh > (small[1] + large[1]) / 2 else "small"
    if kind == "shape":
        crop = mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))]
        h = crop.shape[0]
        w_top = crop[int(0.25 * h)].mean()          # width a quarter from the top ...
        w_bot = crop[min(h - 1, int(0.75 * h))].mean()   # ... and from the bottom
        if w_top < 0.7 * w_bot:
            out["shape"] = "triangle"
        else:
            out["shape"] = "square" if crop.mean() > 0.9 else "circle"
    else:
        # legs: in the band under the seat / table top, is the object in the middle
        # (pedestal) or at the sides (four legs)?
        r0 = int(round(y0 + 0.66 * (y1 - y0)))
        r1 = max(r0 + 1, int(round(y0 + 0.88 * (y1 - y0))))
        band = mask[r0:r1].astype(np.float64)
        cols = (np.arange(W) + 0.5 - x0) / max(x1 - x0, 1e-6)
        central = (cols > 0.35) & (cols < 0.65)
        if not central.any():  # a box one or two pixels wide (small images): its middle column
            central = np.abs(cols - 0.5) == np.abs(cols - 0.5).min()
        centre = band[:, central].mean() if band.size else 0.0
        sides = band[:, ((cols > -0.05) & (cols < 0.25)) | ((cols > 0.75) & (cols < 1.05))]
        sides = sides.mean() if sides.size else 0.0
        out["legs"] = "single" if centre > sides else "four"
    return {k: out[k] for k in ATTRIBUTES[kind]}


def read_attributes(image, kind: str) -> dict[str, str]:
    """Estimate every attribute of a ``kind`` scene from pixels alone (no classifier).

    ``image``: HxWx3 uint8, or float in [-1, 1] (model output), any square size.
    Faces: each colour attribute is the nearest vocabulary colour of the median pixel of a
    fixed region of the face layout (cheeks+neck for skin, top of head for hair, irises,
    shirt, top corners for background); bald = top of head closer to skin than to any hair
    colour; long = region beside the jaw closer to hair than to background; glasses = bridge
    and rim pixels far from the skin colour (towards the frame colour). Furniture/shapes: the
    background is the median of the top rows, the object is segmented by colour
    against it (see ``_segment``); colour = median of the object pixels least mixed with the background, position = nearest
    of left/center/right to the bounding box centre, size = bounding box height against
    the midpoint between small and large, legs = object mass in the central vs. outer
    thirds of the band under the seat/top, shape = triangle if the object is much narrower a quarter from its top than a
    quarter from its bottom, else square/circle by the fill ratio of its bounding box.
    Values are from :data:`ATTRIBUTES`; "unknown" where no object is found, and for every
    attribute of an image noisier than :data:`UNREADABLE_NOISE`.

    Measured (300 random scenes per kind, seed 1): 100% of attributes of clean renders
    at 32 and 64 px for face/chair/table/shape; with Gaussian pixel noise sigma=25 100%
    (faces, chairs, tables) / 97% (shapes); with blur radius 1 px + noise sigma=25
    98% / 95% / 96% / 96% (object colour of thin furniture suffers first). At 16 px some
    attributes cannot be read at all (:func:`legible_attributes`).
    """
    img = _to_uint8(image)
    if _image_noise(img) > UNREADABLE_NOISE:
        return dict.fromkeys(ATTRIBUTES[kind], "unknown")
    return _read_face(img) if kind == "face" else _read_object(img, kind)


#: Pixel noise (:func:`pixel_noise` of one image) above which an image is not read. Reading
#: holds up to Gaussian noise of sigma 25 (pixel noise 0.11-0.12 at 16 and 32 px; 88-100% of
#: each legible attribute read right, the eyes of 16 px faces lowest) and breaks down by sigma
#: 40 (0.16-0.18: sizes and positions 65-93%), where it still answers confidently: on pure
#: noise the reader found the same chair in most images, so a speckled batch scored as
#: consistent. (Measured 2026-12-07: for each kind 200 scenes `sample_scene(rng, kind)` from
#: `rng = np.random.default_rng(1)`, rendered at 16 and 32 px, each render `r` replaced by
#: `np.clip(r + rng.normal(0, S, r.shape), 0, 255).astype(np.uint8)` for S = 25 and 40, then
#: :func:`read_attributes` against the scene and :func:`pixel_noise` of the noisy renders.)
UNREADABLE_NOISE = 0.14

#: Share of clean renders whose attribute must be read back right for it to count as legible.
LEGIBLE = 0.95


@functools.lru_cache(maxsize=None)
def legible_attributes(kind: str, size: int) -> tuple[str, ...]:
    """The attributes of a ``kind`` scene that :func:`read_attributes` reads right from at
    least :data:`LEGIBLE` of 200 clean renders of ``size`` px (seed 0).

    At 32 px and above that is every attribute. At 16 px a face's hair style, furniture's legs
    and a shape's shape are read right 64-77% of the time, and wrong always the same way (long
    hair as short, small chairs as four-legged): read from model samples they would agree, and
    match a prompt naming them, by construction. The metrics below leave them out. None is
    legible at a size too small to render a ``kind`` scene (under 11-13 px)."""
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, kind=kind) for _ in range(200)]
    try:
        reads = [read_attributes(render(scene, size), kind) for scene in scenes]
    except ValueError:  # PIL cannot draw the scene's parts this small
        return ()
    return tuple(k for k in ATTRIBUTES[kind]
                 if np.mean([r[k] == scene.attributes[k] for r, scene in zip(reads, scenes)]) >= LEGIBLE)


# ----------------------------------------------------------------------------------------
# batch metrics
# ----------------------------------------------------------------------------------------

def _object_colour(img: np.ndarray, kind: str) -> np.ndarray:
    """Colour signature of the object, in [0, 1] units: faces concatenate the median
    colours of skin, hair (top of head), eyes and shirt; other kinds give the mean colour
    of the segmented object's core pixels (background colour if nothing is segmented)."""
    if kind == "face":
        c = _face_colours(img)
        return np.concatenate([c[k] for k in ("skin", "hair_top", "eyes", "shirt")]) / 255.0
    bg, mask = _segment(img)
    return (_core(img, bg, mask).mean(0) if mask.sum() >= 4 else bg) / 255.0


def consistency_score(images, kind: str, named: Sequence[str] = ()) -> dict:
    """Consistency of a batch of images that should all show the same ``kind`` object.

    ``named``: the attributes the batch's prompts name. They are what :func:`fidelity`
    measures; agreement is over the others, the ones a prompt leaves free to vary, which is
    the inconsistency the shared attention is to remove.

    Returns a dict with
      * ``agreement`` (float in [0, 1], higher = more consistent): the attributes of
        every image are read with :func:`read_attributes`; for each attribute neither named
        nor illegible at the images' size (:func:`legible_attributes`) the fraction of
        images whose value equals the batch's majority value among the values read
        ("unknown", where no object was found or the image is too noisy to read, agrees
        with nothing: a batch of empty or speckled images is not consistent); mean over
        those attributes, NaN where there are none. 1.0 means every such attribute was read
        and is identical across the batch.
      * ``per_attribute``: that fraction for each of those attributes.
      * ``colour_spread`` (float >= 0, lower = more consistent): mean pairwise Euclidean
        distance between the object colour signatures of the images that can be read (not
        noisier than :data:`UNREADABLE_NOISE`; NaN with fewer than two), in RGB scaled to
        [0, 1] (for faces the RMS over the parts skin, hair, eyes, shirt, i.e. the distance
        of the concatenated colours divided by 2). 0 means identical colours; the maximum
        distance of two RGB colours is sqrt(3) ~ 1.73; neighbouring vocabulary colours
        are ~0.35 apart. Noise pulls every image's signature towards the same grey mix, so
        speckled images would narrow it.
      * ``chroma_spread``: the same with each colour's grey level (the mean of its R, G, B)
        removed: hue and saturation only. Dark colours lie close in RGB; a batch that only got
        darker narrows its ``colour_spread`` but not this.
      * ``readable``: the share of the images clean enough to read, those the spreads are over.
      * ``attributes``: the list of read attribute dicts.
    """
    imgs = [_to_uint8(x) for x in images]
    if not imgs:
        raise ValueError("consistency_score needs a batch of at least one image")
    reads = [read_attributes(x, kind) for x in imgs]
    measured = [k for k in legible_attributes(kind, _size(imgs)) if k not in named]
    per = {}
    for k in measured:
        vals = [r[k] for r in reads]
        per[k] = max((vals.count(v) for v in set(vals) if v != "unknown"), default=0) / len(vals)
    readable = [x for x in imgs if _image_noise(x) <= UNREADABLE_NOISE]
    spreads = dict.fromkeys(("colour_spread", "chroma_spread"), float("nan"))
    if len(readable) >= 2:
        sig = np.stack([_object_colour(x, kind) for x in readable])
        if kind == "face":
            sig = sig / 2.0     # 4 parts -> RMS distance per part
        colours = sig.reshape(len(sig), -1, 3)  # (N, parts, RGB)
        chroma = (colours - colours.mean(-1, keepdims=True)).reshape(len(sig), -1)
        spreads = {"colour_spread": _mean_pairwise_distance(sig), "chroma_spread": _mean_pairwise_distance(chroma)}
    return {"agreement": float(np.mean(list(per.values()))) if per else float("nan"), "per_attribute": per,
            **spreads, "readable": len(readable) / len(imgs), "attributes": reads}


def _size(images) -> int:
    """The side that decides what a batch of same-sized images can show: the shorter one."""
    sizes = {x.shape[:2] for x in images}
    if len(sizes) != 1:
        raise ValueError(f"the images of a batch have different sizes {sorted(sizes)}")
    return min(sizes.pop())


def _mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over the pairs of rows of (N, D) `x`; 0 for a single row."""
    n = len(x)
    if n < 2:
        return 0.0
    dmat = np.linalg.norm(x[:, None] - x[None], axis=-1)
    return float(dmat[np.triu_indices(n, 1)].mean())


def subject_and_scene(score: Mapping, kind: str) -> dict:
    """Split the agreement of a :func:`consistency_score` result into the object and its scene.

    * ``subject_agreement``: mean of its ``per_attribute`` agreement over the object's own
      attributes (colour, legs, size; a face's skin, hair, eyes, glasses, shirt); higher = the
      same object in every image. An attribute not read agrees with nothing, as in ``agreement``.
    * ``scene_diversity``: 1 - mean agreement over :data:`SCENE_ATTRIBUTES` (background,
      position), among the images where the attribute was read; 0 = every image has the same
      background and position, at most 1 - 1/n for n images read. An image too noisy to read
      (or with no object to place) is left out, as it is of the colour spreads: counted as
      disagreeing, a speckled batch would look as free as an unshared one. An attribute read
      in fewer than two images is left out too.

    Plain sharing tends to raise both agreements together; sharing restricted to the subject
    should raise ``subject_agreement`` and keep ``scene_diversity`` near the unshared batches'.
    Over the attributes ``per_attribute`` holds (those left free, :func:`consistency_score`);
    NaN where it holds none of a group, or no scene attribute was read in two images.
    """
    mean = lambda values: float(np.mean(values)) if values else float("nan")
    in_scene = [k for k in score["per_attribute"] if k in SCENE_ATTRIBUTES[kind]]
    own = [v for k, v in score["per_attribute"].items() if k not in in_scene]
    scene = [_agreement_among_read([r[k] for r in score["attributes"]]) for k in in_scene]
    return {"subject_agreement": mean(own), "scene_diversity": 1.0 - mean([a for a in scene if not np.isnan(a)])}


def _agreement_among_read(values: Sequence[str]) -> float:
    """The share of the values read (not "unknown") that are the most common one; NaN where fewer
    than two were read (one image agrees with itself: that says nothing about the batch)."""
    read = [v for v in values if v != "unknown"]
    return max(map(read.count, set(read))) / len(read) if len(read) >= 2 else float("nan")


def diversity_score(images) -> float:
    """Mean pairwise mean-absolute pixel difference of a batch, in [0, 1] units.

    A guard against degenerate "consistency": identical copies score 0. Two random scenes
    typically score 0.2-0.4; the same scene re-rendered with different jitter ~0.02-0.1.
    """
    x = np.stack([_to_uint8(im).astype(np.float32) / 255.0 for im in images])
    n = len(x)
    if n < 2:
        return 0.0
    flat = x.reshape(n, -1)
    total = 0.0
    for i in range(n - 1):
        total += float(np.abs(flat[i + 1:] - flat[i]).mean(axis=1).sum())
    return total / (n * (n - 1) / 2)


def pixel_noise(images) -> float:
    """Noise a sampler left in the images: per image the median, over pixels, of how far a pixel
    lies from the median of its 3×3 neighbourhood (largest of R, G, B, in [0, 1] units); mean
    over the batch.

    Every scene is flat colour areas, so a clean render scores 0 at any size (edges and corners
    are too few pixels to move the median). Gaussian pixel noise of standard deviation s scores
    about 1.2·s (s up to 25/255). A sample covered in the speckle that a small model's
    deterministic sampling can leave (CONSISTENCY_NOTES.md, question 4) scores 0.1-0.25, a
    clean-looking sample below 0.03.
    """
    return float(np.mean([_image_noise(_to_uint8(im)) for im in images]))


def _image_noise(img: np.ndarray) -> float:
    """:func:`pixel_noise` of one HxWx3 uint8 image."""
    x = img.astype(np.float32) / 255.0
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(0, 1))  # (H, W, 3, 3, 3)
    deviation = np.abs(x - np.median(windows, axis=(-2, -1))).max(axis=-1)  # (H, W)
    return float(np.median(deviation))


def fidelity(images, caption_scene: Scene | str) -> float:
    """Fraction of the attributes NAMED in the prompt that are read back correctly,
    averaged over the images and the named attributes that are legible at the images' size
    (:func:`legible_attributes`: an attribute read the same way whatever is drawn would
    match the prompt by construction).

    ``caption_scene``: a (partial) :class:`Scene` holding the named attributes, or the
    caption text itself (parsed with :func:`parse_caption`). NaN if nothing legible is named.
    """
    if isinstance(caption_scene, str):
        caption_scene = parse_caption(caption_scene)
        if caption_scene is None:
            return float("nan")
    images = [_to_uint8(im) for im in images]
    legible = legible_attributes(caption_scene.kind, _size(images)) if images else ()
    named = {k: v for k, v in caption_scene.attributes.items() if k in legible}
    if not named:
        return float("nan")
    hits = []
    for im in images:
        r = read_attributes(im, caption_scene.kind)
        hits += [r[k] == v for k, v in named.items()]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------------------
# torch dataset
# ----------------------------------------------------------------------------------------

class ProceduralScenes(Dataset):
    """Map-style dataset of procedural scenes for LatentDiffusion training.

    ``__getitem__(i)`` is deterministic in ``(seed, i)`` and returns
    ``{"image": float32 HxWx3 in [-1, 1], "caption": str, "kind": str}``. Use
    ``first_stage_key: image`` and ``cond_stage_key: caption`` in the model config, and a
    different ``seed`` for the validation split. With ``condition="outline"`` or ``"mask"``
    (see :func:`condition_map`) each item also has ``"cond"``: float32 1xHxW in {0, 1}, the
    layout map of the same scene, for T2I-Adapter training (scripts/train_adapter.py); the
    scenes and captions are the same as without it. Example data config::

        data:
          target: main.DataModuleFromConfig
          params:
            batch_size: 64
            train:
              target: ldm.data.procedural.ProceduralScenes
              params: {size: 32, length: 100000, seed: 0}
            validation:
              target: ldm.data.procedural.ProceduralScenes
              params: {size: 32, length: 512, seed: 1}
    """

    def __init__(self, size: int = 32, length: int = 100000, seed: int = 0,
                 kinds: Sequence[str] = KINDS, p_empty: float = 0.1, condition: str | None = None):
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)
        self.kinds = tuple(str(k) for k in kinds)
        for k in self.kinds:
            if k not in ATTRIBUTES:
                raise ValueError(f"unknown kind {k!r}")
        self.p_empty = float(p_empty)
        if condition is not None and condition not in CONDITION_KINDS:
            raise ValueError(f"unknown condition {condition!r}; expected one of {CONDITION_KINDS} or None")
        self.condition = condition

    def __len__(self):
        return self.length

    def vocabulary(self) -> list[str]:
        """Every word this dataset's captions can contain (scripts warn about prompt words outside it)."""
        return vocabulary(self.kinds)

    def scene(self, i: int) -> tuple[Scene, str, dict[str, str]]:
        """(scene, caption, named attributes) of item ``i``."""
        if not 0 <= i < self.length:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, int(i)])
        sc = sample_scene(rng, kinds=self.kinds)
        text, named = caption_with_attributes(sc, rng, self.p_empty)
        return sc, text, named

    def __getitem__(self, i: int) -> dict:
        sc, text, _ = self.scene(i)
        img = render(sc, self.size).astype(np.float32) / 127.5 - 1.0
        item = {"image": img, "caption": text, "kind": sc.kind}
        if self.condition is not None:
            # channels first: it goes straight into the adapter, not through get_input
            item["cond"] = condition_map(sc, self.condition, self.size)[None]
        return item
