"""Write a preview grid of procedural scenes with their captions (PIL only).

    python scripts/make_procedural_samples.py out.png --n 24 --size 32 --scale 8 --seed 0

Each tile is one ProceduralScenes item upscaled (nearest neighbour) with its caption
(wrapped) underneath, and the attributes read back from its pixels marked ok/BAD.
"""
import argparse
import os
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from ldm.data.procedural import ALL_KINDS, KINDS, ProceduralScenes, read_attributes  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output PNG path")
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--cols", type=int, default=6)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS),
                    help=f"comma separated subset of {ALL_KINDS}")
    args = ap.parse_args(argv)

    ds = ProceduralScenes(size=args.size, length=args.n, seed=args.seed,
                          kinds=tuple(args.kinds.split(",")))
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
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({args.n} scenes)")


if __name__ == "__main__":
    main()
