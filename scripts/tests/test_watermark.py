"""Print the invisible watermark decoded from an image: "StableDiffusionV1" in the files
txt2img.py and img2img.py write with --watermark, "null" where the bits decode to no text.

    python3 scripts/tests/test_watermark.py outputs/txt2img-samples/grid-0000.png

The library's DWT-DCT mark is fragile: small or flat images may come back with a few wrong bytes.
"""
import argparse

import cv2
from imwatermark import WatermarkDecoder


def testit(img_path):
    bgr = cv2.imread(img_path)
    if bgr is None:
        raise SystemExit(f"error: cannot read {img_path} as an image")
    decoder = WatermarkDecoder('bytes', 136)  # 17 bytes, len("StableDiffusionV1")
    watermark = decoder.decode(bgr, 'dwtDct')
    try:
        dec = watermark.decode('utf-8')
    except UnicodeDecodeError:
        dec = "null"
    print(dec)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("img_path", help="a PNG or JPEG")
    testit(parser.parse_args().img_path)
