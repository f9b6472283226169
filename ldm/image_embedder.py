"""Embedding-based consistency for prompts the procedural read-back cannot measure (real SD 1.x).

A batch is consistent when its images show the same object; a self-supervised (DINO/DINOv2) or
CLIP image encoder maps images of the same object close together, so the mean pairwise cosine
similarity of the batch's embeddings measures it without any attribute labels (DreamSim,
ConsiStory and StoryDiffusion evaluate the same way). DINO is the better judge of "same
object": CLIP embeddings mostly agree on the category, which every image of a prompt shares.

Nothing is downloaded: the model is a local directory in the transformers layout (config.json +
weights), e.g. ``facebook/dinov2-small`` or ``openai/clip-vit-base-patch32`` saved elsewhere with
``save_pretrained`` or copied from a hub cache.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from ldm.diffusers_folder import cache_snapshot

# Normalisation the encoders were trained with, used when the directory has no
# preprocessor_config.json: ImageNet statistics (DINO, ViT) and CLIP's own.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_TYPES = ("clip", "clip_vision_model")


class EmbedderError(Exception):
    """The image-embedding model cannot be used; the message is one line saying why and what to do."""


class ImageEmbedder:
    """Images (N, 3, H, W) in [0, 1] -> unit vectors (N, D)."""

    def __init__(self, model, image_size: int, mean, std, device):
        self.model = model.eval().to(device)
        self.image_size = image_size
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device, torch.float32), size=(self.image_size, self.image_size),
                          mode="bicubic", align_corners=False).clamp(0, 1)
        out = self.model(pixel_values=(x - self.mean) / self.std)
        if getattr(out, "image_embeds", None) is not None:  # CLIP: the projected embedding
            features = out.image_embeds
        else:  # DINO/ViT: the class token, the image-level summary those models are trained to give
            features = out.last_hidden_state[:, 0]
        return F.normalize(features.float(), dim=-1)


def load_embedder(path, device="cpu") -> ImageEmbedder:
    """The image encoder in the local transformers directory ``path`` (or the Hugging Face cache's
    models--ORG--NAME folder of one); EmbedderError if unusable."""
    path = cache_snapshot(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EmbedderError(f"--embedder {path} is not a local model directory with a config.json (give the "
                            f"folder of a transformers image model, e.g. facebook/dinov2-small saved with "
                            f"save_pretrained; nothing is downloaded)")
    from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model_class = CLIPVisionModelWithProjection if config.model_type in CLIP_TYPES else AutoModel
        model, loading = model_class.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        from ldm.util import first_line
        raise EmbedderError(f"cannot load the image model in {path}: {first_line(e)}") from e
    if loading["missing_keys"]:  # transformers initialises them at random, with a printed table only
        missing = sorted(loading["missing_keys"])
        raise EmbedderError(f"the image model in {path} lacks {len(missing)} weight(s), e.g. {missing[0]}, which "
                            f"would embed with random values (a CLIP vision folder needs its visual_projection: "
                            f"save CLIPVisionModelWithProjection or CLIPModel)")
    vision = getattr(config, "vision_config", config)
    mean, std = _normalisation(path, config.model_type)
    return ImageEmbedder(model, vision.image_size, mean, std, device)


def _normalisation(path, model_type):
    processor = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(processor):
        with open(processor) as f:
            settings = json.load(f)
        if "image_mean" in settings and "image_std" in settings:
            return settings["image_mean"], settings["image_std"]
    return (CLIP_MEAN, CLIP_STD) if model_type in CLIP_TYPES else (IMAGENET_MEAN, IMAGENET_STD)


def embedding_similarity(embeddings: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of different images (1 = same embedding everywhere)."""
    n = len(embeddings)
    if n < 2:
        return float("nan")
    similarity = embeddings @ embeddings.T  # (N, N), unit vectors
    return ((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))).item()


def reference_similarity(embeddings: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean cosine similarity of each image's embedding (N, D) to the reference's (1, D), unit vectors."""
    return (embeddings @ reference.T).mean().item()
