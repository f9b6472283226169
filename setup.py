from setuptools import find_packages, setup

setup(
    name="latent-diffusion",
    version="0.0.1",
    description="Latent diffusion / Stable Diffusion v1 (CompVis), on a current PyTorch stack",
    packages=find_packages(include=["ldm", "ldm.*"]),
    # the CLIP BPE vocabulary the offline tokenizer is built from
    package_data={"ldm.modules.encoders": ["bpe_simple_vocab_16e6.txt.gz", "CLIP_VOCAB_NOTICE.md"]},
    python_requires=">=3.10",
    # lower bounds: the oldest versions scripts/check_oldest_stack.sh runs the suite on
    install_requires=[
        "torch>=2.6",  # torch.serialization.safe_globals, with (object, name) pairs: .ckpt loading
        "numpy>=1.26.4",
        "tqdm",
        "pillow",
        "omegaconf>=2.3.0",
        "einops>=0.6.0",
        "tokenizers>=0.19.1",  # SD's CLIP tokenizer (ldm/modules/encoders/clip_text.py)
        "transformers>=4.40.0",  # CLIP from a local folder or the hub, BERT, image embedders; not SD's text encoder
        "safetensors>=0.4.1",
        "pytorch-lightning>=2.1.0",  # main.py's training; sampling needs only its lightning-utilities
        "lightning-utilities",
    ],
    extras_require={
        # diffusers: parity of pipeline-folder loading; opencv: canny parity; opencv and scipy: the
        # BSRGAN degradations; invisible-watermark: --watermark (it brings opencv-python, ~80 MB)
        "test": ["pytest", "diffusers", "opencv-python-headless", "scipy", "invisible-watermark"],
        # Optional post-processing used by scripts/txt2img.py --watermark / --safety-checker.
        "watermark": ["invisible-watermark", "opencv-python-headless"],
        "safety": ["diffusers"],
        # T2I-Adapter canny edges exactly as upstream (a numpy re-implementation is used without it).
        "adapter": ["opencv-python-headless"],
        # ldm.modules.image_degradation (super-resolution training data).
        "data": ["opencv-python-headless", "scipy", "albumentations"],
    },
)
