"""What a sampling run writes: its images through the optional safety checker and invisible
watermark, as numbered PNGs (never overwriting) with the run's settings in each file's metadata.
"""
import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch

from ldm import diffusers_folder
from ldm.hub import pretrained_source
from ldm.image_io import make_grid, next_free_index, save_png, to_pil, upscale

logger = logging.getLogger(__name__)

SAFETY_MODEL_ID = "CompVis/stable-diffusion-safety-checker"
WATERMARK_TEXT = "StableDiffusionV1"
WATERMARK_MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images (its DWT-DCT needs the room)


class Postprocess(NamedTuple):
    """What a run does to its images on the way out. `batch`: to each batch of samples, before any
    file or grid is made of them (the safety checker, whose blanked images stay blank in the grid).
    `png`: to the pixels of every PNG the run writes, samples and grids, at their saved size (the
    invisible watermark, which a reader decodes from the file as it is: upstream marked each file)."""
    batch: Callable
    png: Callable | None = None


def build_postprocess(opt, height, width):
    """The run's Postprocess for (B, 3, height, width) images in [0, 1], saved --display-scale
    times larger. Everything is loaded here, before sampling, so a missing optional dependency or an
    image too small to watermark fails fast with one line."""
    saved_height, saved_width = height * opt.display_scale, width * opt.display_scale
    if opt.watermark and saved_height * saved_width < WATERMARK_MIN_PIXELS:
        raise SystemExit(f"error: --watermark needs images of 256x256 pixels or more (invisible-watermark's "
                         f"limit), this run saves {saved_width}x{saved_height}: leave it out, or generate larger "
                         "images or save them larger (--display-scale)")
    check = (_load_safety_checker(*safety_checker_sources(opt.safety_checker, opt.ckpt))
             if opt.safety_checker is not None else lambda images: images)
    return Postprocess(batch=check, png=_load_watermarker() if opt.watermark else None)


def safety_checker_sources(folder, ckpt):
    """(checker, feature extractor): the folders to load them from, or the hub id for both.
    `folder`: --safety-checker's FOLDER, "" where none was given. SD v1 pipelines on the hub
    (CompVis/stable-diffusion-v1-4) ship the checker, so a user with a pipeline folder has it."""
    pipeline = diffusers_folder.cache_snapshot(folder or ckpt) if folder or ckpt else None
    if pipeline and os.path.isdir(os.path.join(pipeline, "safety_checker")):  # FOLDER or --ckpt
        return os.path.join(pipeline, "safety_checker"), os.path.join(pipeline, "feature_extractor")
    if folder:  # the checker's own folder
        return pipeline, pipeline
    return SAFETY_MODEL_ID, SAFETY_MODEL_ID


def _load_safety_checker(checker_source, extractor_source):
    try:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import AutoImageProcessor
    except ImportError as e:
        raise SystemExit(f"error: --safety-checker needs diffusers (pip install diffusers): {e}")

    try:
        # not AutoFeatureExtractor: transformers 5 no longer maps CLIP's preprocessor config to one
        # one hub id for both, unless given folders: the hub is asked once
        sources = {source: pretrained_source(source) for source in {extractor_source, checker_source}}
        extractor = AutoImageProcessor.from_pretrained(sources[extractor_source])
        checker = StableDiffusionSafetyChecker.from_pretrained(sources[checker_source])
    except Exception as e:  # offline hub, missing cache, a folder without the files ...: "weights unavailable"
        from ldm.util import first_line
        raise SystemExit(f"error: --safety-checker could not load {checker_source}: {first_line(e)}; "
                         "--safety-checker FOLDER takes a local copy (a diffusers SD pipeline folder)")
    logger.info("safety checker: %s", checker_source)

    def check(images):
        array = images.permute(0, 2, 3, 1).numpy()
        features = extractor([to_pil(img) for img in images], return_tensors="pt")
        checked, flagged = checker(images=array, clip_input=features.pixel_values)
        for i, nsfw in enumerate(flagged):
            if nsfw:
                logger.warning("safety checker flagged image %d; replacing it with black", i)
                checked[i] = 0
        return torch.from_numpy(checked).permute(0, 3, 1, 2)

    return check


def _load_watermarker():
    try:
        import cv2
        import numpy as np
        from imwatermark import WatermarkDecoder, WatermarkEncoder
        from PIL import Image
    except ImportError as e:
        raise SystemExit("error: --watermark needs invisible-watermark and opencv-python-headless "
                         f"(pip install invisible-watermark opencv-python-headless): {e}")
    text = WATERMARK_TEXT.encode("utf-8")
    encoder, decoder = WatermarkEncoder(), WatermarkDecoder("bytes", 8 * len(text))
    encoder.set_watermark("bytes", text)
    unreadable = []

    def watermark(image):  # upstream's put_watermark, read back as a reader would
        bgr = encoder.encode(cv2.cvtColor(np.array(image), cv2.COLOR_RGB2BGR), "dwtDct")
        if not unreadable and decoder.decode(bgr, "dwtDct") != text:
            unreadable.append(True)  # once per run
            logger.warning("the invisible watermark cannot be read back from some of this run's files: flat "
                           "images (the small models') hide it badly; a larger --display-scale may help")
        return Image.fromarray(bgr[:, :, ::-1])

    return watermark




def run_metadata(opt, *, prompt, height, width, extra_metadata=None, batch=None, position=None):
    """The JSON stored in each PNG's "parameters" text chunk.

    ``extra_metadata`` is a dict other features add their settings to (stored under "extra").
    A sample also records where it was made: ``batch`` (from 0, in the run) and ``position`` in
    that batch, which with the same seed, batch size and --fixed_code reproduces it and is what
    --anchor-images takes.
    """
    metadata = {
        "prompt": prompt,
        "seed": opt.seed,
        "sampler": opt.sampler,
        "steps": opt.ddim_steps,
        "scale": opt.scale,
        "negative_prompt": opt.negative_prompt,
        "eta": opt.ddim_eta,
        "H": height,
        "W": width,
        "config": opt.config,
        "ckpt": None if opt.random_weights else opt.ckpt,
        "device": opt.device,
        "precision": opt.computed_precision,
        "extra": dict(extra_metadata or {}),
    }
    if opt.vae:
        metadata["vae"] = opt.vae
    if batch is not None:  # with these, the batch's size and how its noise was drawn reproduce the sample
        metadata.update(batch=batch, position=position, n_samples=opt.n_samples, fixed_code=opt.fixed_code)
    if opt.random_weights:
        metadata["random_weights"] = True
    return metadata


SAMPLES_FOLDER = "samples"


class OutputWriter:
    """Saves samples as ``outdir/samples/NNNNN.png`` and grids as ``outdir/grid-NNNN.png``.

    Numbering continues after the highest existing index; existing files are never overwritten.
    """

    def __init__(self, outdir, display_scale=1, mark=None):
        self.outdir = outdir
        self.sample_dir = os.path.join(outdir, SAMPLES_FOLDER)
        self.display_scale = display_scale
        self.mark = mark  # PIL image -> PIL image, on every file's pixels as saved (Postprocess.png)
        self.next_sample = None  # the samples folder is made for the first sample: a grid alone needs none
        self.next_grid = next_free_index(outdir, prefix="grid-", digits=4)

    def save_samples(self, images, metadata):
        """Save each (3, H, W) image; ``metadata(i)`` gives the parameters for image i of the batch."""
        if self.next_sample is None:
            os.makedirs(self.sample_dir, exist_ok=True)
            self.next_sample = next_free_index(self.sample_dir, digits=5)
        paths = []
        for i, image in enumerate(images):
            path, self.next_sample = self._save(image, metadata(i), self.sample_dir, "", 5, self.next_sample)
            paths.append(path)
        return paths

    def save_grid(self, images, nrow, metadata):
        path, self.next_grid = self._save(make_grid(images, nrow=nrow), metadata, self.outdir, "grid-", 4,
                                          self.next_grid)
        return path

    def _save(self, image, metadata, directory, prefix, digits, index):
        """Save under the first free number from `index` on; returns (path, the next number). Another
        run writing into the same folder may have taken the number since this one looked: the file
        is created exclusively, so that is a FileExistsError, and the next free number is taken."""
        pixels = upscale(to_pil(image), self.display_scale)
        pixels = self.mark(pixels) if self.mark else pixels
        while True:
            path = os.path.join(directory, f"{prefix}{index:0{digits}}.png")
            try:
                return save_png(pixels, path, metadata), index + 1
            except FileExistsError:
                index = max(index + 1, next_free_index(directory, prefix, digits))


def written_message(opt, paths):
    """The run's last line: where the samples are, or that the flags asked for none."""
    if paths:
        return f"{len(paths)} files written; your samples are ready and waiting for you here: {opt.outdir}"
    return "no files written: --skip_save and --skip_grid leave out the samples and the grid"


def save_results(opt, results, *, height, width, extra_metadata=None, mark=None):
    """Save each batch of ``results`` ((prompts, images) pairs) as samples (unless --skip_save)
    and all of them as one grid (unless --skip_grid), with metadata, each file's pixels through
    `mark` (Postprocess.png); returns the paths."""
    writer = OutputWriter(opt.outdir, opt.display_scale, mark)

    def metadata(prompt, **where):
        return run_metadata(opt, prompt=prompt, height=height, width=width, extra_metadata=extra_metadata, **where)

    def grid():
        if not all_images:
            return []
        prompt = all_prompts[0] if len(set(all_prompts)) == 1 else all_prompts
        with ctrl_c_deferred():
            return [writer.save_grid(torch.cat(all_images), opt.n_rows or opt.n_samples, metadata(prompt))]

    paths, all_images, all_prompts, finished = [], [], [], 0
    try:
        for batch, (prompts, images) in enumerate(results):
            with ctrl_c_deferred():
                if not opt.skip_save:
                    paths += writer.save_samples(images, lambda i: metadata(prompts[i], batch=batch, position=i))
                if not opt.skip_grid:
                    all_images.append(images)
                    all_prompts += prompts
                finished += 1
    except KeyboardInterrupt:  # Ctrl-C in a long run: the finished batches keep their samples and get their grid
        paths += grid()
        logger.warning("interrupted after %d finished batch(es): %s", finished, written_message(opt, paths))
        raise
    return paths + grid()


@contextmanager
def ctrl_c_deferred():
    """Ctrl-C arriving inside the block takes effect at its end, so that a batch's files are written
    whole (a PNG cut off mid-write would be left broken, under a name never reused). Where Python
    does not handle Ctrl-C (a thread, a process that ignores it) the block runs as it is."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler or \
            threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def feature_metadata(opt, extra_metadata=None):
    """Log the optional features this run uses and add their settings to the PNG metadata
    (keys the caller already set win)."""
    extra = dict(extra_metadata or {})
    for key, attribute in (("consistent_attn", "consistency"), ("run_anchors", "run_anchors"),
                           ("reference", "reference"), ("reference_image", "image_anchor"),
                           ("t2i_adapter", "adapters")):
        feature = getattr(opt, attribute, None)
        if feature is not None:
            logger.info("%s: %s", key, feature.describe())
            extra.setdefault(key, feature.describe())
    return extra
