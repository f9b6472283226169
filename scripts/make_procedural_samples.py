"""Write a preview grid of procedural scenes with their captions (PIL only).

    python3 scripts/make_procedural_samples.py out.png --n 24 --size 32 --scale 8 --seed 0

Each tile is one ProceduralScenes item upscaled (nearest neighbour) with its caption
(wrapped) underneath, and the attributes read back from its pixels marked ok/BAD.
"""
import logging
import os
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.data.procedural import ALL_KINDS, KINDS, ProceduralScenes, read_attributes  # noqa: E402
from ldm.script_helpers import ArgumentParser, check_new_file, configure_logging  # noqa: E402

logger = logging.getLogger("make_procedural_samples")

# The renderer draws every scene from 13 px up (the furniture's parts collide below that);
# 16 leaves a margin. It is designed for 32.
MIN_SIZE = 16


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output PNG path (a new file; an existing one is never overwritten)")
    ap.add_argument("--n", type=int, default=24, help="number of scenes")
    ap.add_argument("--cols", type=int, default=6, help="tiles per row")
    ap.add_argument("--size", type=int, default=32, help=f"scene size in pixels (at least {MIN_SIZE})")
    ap.add_argument("--scale", type=int, default=8, help="nearest-neighbour upscale of each tile")
    ap.add_argument("--seed", type=int, default=0, help="dataset seed (0 or more)")
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma separated subset of {','.join(ALL_KINDS)}")
    args = ap.parse_args(argv)
    for flag, value, least in (("--n", args.n, 1), ("--cols", args.cols, 1), ("--size", args.size, MIN_SIZE),
                               ("--scale", args.scale, 1), ("--seed", args.seed, 0)):
        if value < least:
            ap.error(f"{flag} must be at least {least}, got {value}")
    args.kinds = tuple(args.kinds.split(","))
    unknown = [k for k in args.kinds if k not in ALL_KINDS]
    if unknown:
        ap.error(f"--kinds: unknown kind {unknown[0]!r}; choose from {','.join(ALL_KINDS)}")
    if os.path.splitext(args.out)[1].lower() != ".png":
        ap.error(f"output {args.out} must be a .png file path")
    check_new_file(ap, "output", args.out)
    return args


def main(argv=None):
    configure_logging()
    args = parse_args(argv)
    ds = ProceduralScenes(size=args.size, length=args.n, seed=args.seed, kinds=args.kinds)
    tile = args.size * args.scale
    text_h = 64
    cols = min(args.cols, args.n)
    rows = (args.n + cols - 1) // cols
    grid = Image.new("RGB", (cols * (tile + 8), rows * (tile + text_h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(args.n):
        scene, text, _ = ds.scene(i)
        item = ds[i]
        img = ((item["image"] + 1.0) * 127.5).round().astype(np.uint8)
        ok = read_attributes(img, scene.kind) == dict(scene.attributes)
        x = (i % cols) * (tile + 8) + 4
        y = (i // cols) * (tile + text_h + 8) + 4
        grid.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (x, y))
        lines = textwrap.wrap(text or '"" (empty)', width=tile // 6)[:4]
        lines.append("read-back ok" if ok else "read-back BAD")
        draw.multiline_text((x, y + tile + 2), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    with open(args.out, "xb") as f:  # "x": a file that appeared meanwhile is still not overwritten
        grid.save(f, format="PNG")
    logger.info("wrote %s (%d scenes)", args.out, args.n)


if __name__ == "__main__":
    main()
