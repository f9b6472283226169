import os, sys, glob, datetime, logging, math, yaml
import torch
import time
import numpy as np
from tqdm import trange

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's ldm, installed (pip install -e .) or not
from ldm.checkpoints import build_with_weights
from ldm.model_choice import non_text_conditioning, run_config
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.script_helpers import ArgumentParser, check_output_dir, check_steps, configure_logging, positive_int
from ldm.util import ModelError, first_line

logger = logging.getLogger("sample_diffusion")

def custom_to_pil(x):
    x = x.detach().cpu()
    x = torch.clamp(x, -1., 1.)
    x = (x + 1.) / 2.
    x = x.permute(1, 2, 0).numpy()
    x = (255 * x).astype(np.uint8)
    x = Image.fromarray(x)
    if not x.mode == "RGB":
        x = x.convert("RGB")
    return x


def custom_to_np(x):
    # saves the batch in adm style as in https://github.com/openai/guided-diffusion/blob/main/scripts/image_sample.py
    sample = x.detach().cpu()
    sample = ((sample + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    sample = sample.permute(0, 2, 3, 1)
    sample = sample.contiguous()
    return sample


@torch.no_grad()
def convsample(model, shape):
    """The full chain of the model's timesteps (-v), and the row of its predicted x_0 along the way."""
    return model.progressive_denoising(None, shape, verbose=True)


@torch.no_grad()
def convsample_ddim(model, steps, shape, eta=1.0
                    ):
    ddim = DDIMSampler(model)
    bs = shape[0]
    shape = shape[1:]
    samples, intermediates = ddim.sample(steps, batch_size=bs, shape=shape, eta=eta, verbose=False,)
    return samples, intermediates


@torch.no_grad()
def make_convolutional_sample(model, batch_size, vanilla=False, custom_steps=None, eta=1.0,):


    log = dict()

    shape = [batch_size,
             model.model.diffusion_model.in_channels,
             model.model.diffusion_model.image_size,
             model.model.diffusion_model.image_size]

    with model.ema_scope("Plotting"):
        t0 = time.time()
        if vanilla:
            sample, progrow = convsample(model, shape)
        else:
            sample, intermediates = convsample_ddim(model,  steps=custom_steps, shape=shape,
                                                    eta=eta)

        t1 = time.time()

    x_sample = model.decode_first_stage(sample)

    log["sample"] = x_sample
    log["time"] = t1 - t0
    log['throughput'] = sample.shape[0] / (t1 - t0)
    logger.info("throughput for this batch: %.2f images/s", log["throughput"])
    return log

def run(model, logdir, batch_size=50, vanilla=False, custom_steps=None, eta=None, n_samples=50000, nplog=None):
    if vanilla:
        logger.info("vanilla DDPM sampling with %d steps", model.num_timesteps)
    else:
        logger.info("DDIM sampling with %s steps and eta=%s", custom_steps, eta)


    tstart = time.time()
    n_saved = len(glob.glob(os.path.join(logdir,'*.png')))  # upstream's "- 1" named the first sample_-00001
    # path = logdir
    if model.cond_stage_model is None:
        all_images = []

        logger.info("unconditional sampling of %d samples", n_samples)
        # upstream drew n_samples // batch_size batches: none (and a crash) for fewer samples than a batch
        for _ in trange(math.ceil(n_samples / batch_size), desc="Sampling Batches (unconditional)"):
            logs = make_convolutional_sample(model, batch_size=min(batch_size, n_samples - n_saved),
                                             vanilla=vanilla, custom_steps=custom_steps,
                                             eta=eta)
            n_saved = save_logs(logs, logdir, n_saved=n_saved, key="sample")
            all_images.extend([custom_to_np(logs["sample"])])
            if n_saved >= n_samples:
                logger.info("finished after %d samples", n_saved)
                break
        all_img = np.concatenate(all_images, axis=0)
        all_img = all_img[:n_samples]
        shape_str = "x".join([str(x) for x in all_img.shape])
        nppath = os.path.join(nplog, f"{shape_str}-samples.npz")
        np.savez(nppath, all_img)

    else:
       raise NotImplementedError('Currently only sampling for unconditional models supported.')

    logger.info("sampling of %d images finished in %.2f minutes", n_saved, (time.time() - tstart) / 60.)


def save_logs(logs, path, n_saved=0, key="sample"):
    for k in logs:
        if k == key:
            for x in logs[key]:
                img = custom_to_pil(x)
                imgpath = os.path.join(path, f"{key}_{n_saved:06}.png")
                img.save(imgpath)
                n_saved += 1
    return n_saved


def get_parser():
    parser = ArgumentParser()
    parser.add_argument(
        "-r",
        "--resume",
        type=str,
        required=True,
        help="a model folder (config.yaml and model.ckpt), a checkpoint in one, or a checkpoint of a main.py run "
             "(LOGDIR/checkpoints/last.ckpt, whose config is in LOGDIR/configs)",
    )
    # upstream's nargs="?" let a bare -n/-e/-c/-l/--batch_size through as None: a crash at sampling
    parser.add_argument("-n", "--n_samples", type=positive_int, default=50000, help="number of samples to draw")
    # -e and -c default to None so that -v can refuse them: upstream ignored them there silently
    parser.add_argument("-e", "--eta", type=float, default=None,
                        help="DDIM eta, 0 (deterministic) to 1 (DDPM-like, the default)")
    parser.add_argument("-v", "--vanilla_sample", default=False, action='store_true',
                        help="sample with the model's full DDPM chain instead of DDIM (not with -c or -e)")
    parser.add_argument("-l", "--logdir", type=str, default="none",
                        help="write the samples below this folder (in a subfolder named after the run) instead of "
                             "the run's own folder")
    parser.add_argument("-c", "--custom_steps", type=positive_int, default=None,
                        help="number of DDIM steps (default 50)")
    parser.add_argument("--batch_size", type=positive_int, default=10, help="images sampled at once")
    parser.add_argument("--unsafe-pickle", action="store_true", help="allow full unpickling of a TRUSTED .ckpt (can run arbitrary code)")
    return parser


def read_run_config(parser, path, overrides):
    """(config, its model's params) of a run's config.yaml with the KEY=VALUE overrides; a file
    edited by hand into something else, or overrides that do not fit it, are one error line."""
    where = f"the model config {path}{' with ' + ' '.join(overrides) if overrides else ''}"
    try:  # TypeError: a file that is a list, which does not merge with the overrides' mapping
        config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
        model = config.model
    except (OSError, yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError, TypeError) as e:
        parser.error(f"cannot read {where}: {first_line(e)}")
    params = (model.get("params") or {}) if isinstance(model, DictConfig) else None
    if not isinstance(params, (DictConfig, dict)):
        parser.error(f"{where} is not a model config: its model needs a target and a mapping of params")
    return config, params


def load_model(config, ckpt, unsafe_pickle=False):
    """The model of `config` with the weights of `ckpt` (a main.py checkpoint, safetensors or a bare
    state dict), on CUDA where there is one (upstream forced it), and the checkpoint's global step
    (0 where it has none). Upstream loaded non-strictly: a checkpoint of another model sampled noise."""
    model, global_step = build_with_weights(config, ckpt, unsafe_pickle=unsafe_pickle)
    return model.eval().to("cuda" if torch.cuda.is_available() else "cpu"), global_step or 0


if __name__ == "__main__":
    now = datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    sys.path.append(os.getcwd())

    configure_logging()
    parser = get_parser()
    opt, unknown = parser.parse_known_args()
    ckpt = None
    stray = [arg for arg in unknown if arg.startswith("-") or "=" not in arg]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)} (config overrides are written KEY=VALUE)")
    if opt.vanilla_sample and (opt.eta is not None or opt.custom_steps is not None):
        parser.error("-v/--vanilla_sample runs the model's full DDPM chain: -c/--custom_steps and -e/--eta are "
                     "DDIM settings, leave them out (or leave out -v to sample with DDIM)")
    opt.eta = 1.0 if opt.eta is None else opt.eta
    opt.custom_steps = 50 if opt.custom_steps is None else opt.custom_steps
    if not 0 <= opt.eta <= 1:
        parser.error(f"-e/--eta must be between 0 (deterministic) and 1 (DDPM-like), got {opt.eta}")

    if not os.path.exists(opt.resume):
        parser.error(f"cannot find {opt.resume} (pass -r a log folder with config.yaml and model.ckpt, "
                     "or a checkpoint in one)")
    if os.path.isfile(opt.resume):
        logdir = os.path.dirname(opt.resume)
        logger.info("logdir is %s", logdir)
        ckpt = opt.resume
    else:
        assert os.path.isdir(opt.resume), f"{opt.resume} is not a directory"
        logdir = opt.resume.rstrip("/")
        ckpt = os.path.join(logdir, "model.ckpt")
        if not os.path.isfile(ckpt):
            parser.error(f"no model.ckpt in {logdir} (pass -r the checkpoint itself)")

    base_configs = sorted(glob.glob(os.path.join(logdir, "config.yaml")))
    of_run = None if base_configs else run_config(ckpt)
    if of_run:  # a checkpoint of a main.py run (LOGDIR/checkpoints/last.ckpt)
        base_configs = [of_run]
        # samples go to the run (LOGDIR/configs/..; -l: a folder named after it), not to checkpoints/
        logdir = os.path.dirname(os.path.dirname(base_configs[0]))
    if not base_configs:
        parser.error(f"no config.yaml in {logdir or '.'}: the model config must be next to the checkpoint")
    opt.base = base_configs

    config, params = read_run_config(parser, opt.base[0], unknown)
    if params.get("cond_stage_config") not in (None, "__is_unconditional__"):  # upstream: NotImplementedError later
        text = non_text_conditioning(params) is None
        parser.error(f"{ckpt} is a conditional model (conditioned on its {params.get('cond_stage_key')!r}); this "
                     "script samples unconditional ones" + (f": for this text-to-image model use scripts/txt2img.py "
                                                            f"--config {opt.base[0]} --ckpt {ckpt}" if text else ""))

    if not opt.vanilla_sample:
        if params.get("parameterization", "eps") != "eps":  # DDIM reads the output as noise
            parser.error(f"{ckpt} predicts {params.parameterization}, and DDIM samples noise-predicting models: "
                         "pass -v to sample its full chain")
        check_steps(parser, "-c/--custom_steps", opt.custom_steps, params.get("timesteps", 1000))

    if opt.logdir != "none":
        check_output_dir(parser, "-l/--logdir", opt.logdir)
        locallog = os.path.basename(os.path.abspath(logdir))  # logdir "" (a checkpoint in the current folder)
        logger.info("switching logdir from %s to %s", logdir, os.path.join(opt.logdir, locallog))
        logdir = os.path.join(opt.logdir, locallog)

    logger.debug("config:\n%s", OmegaConf.to_yaml(config))

    try:
        model, global_step = load_model(config, ckpt, opt.unsafe_pickle)
    except ModelError as e:
        parser.error(str(e))
    logger.info("global step: %s", global_step)
    logdir = os.path.join(logdir, "samples", f"{global_step:08}", now)
    imglogdir = os.path.join(logdir, "img")
    numpylogdir = os.path.join(logdir, "numpy")

    os.makedirs(imglogdir)
    os.makedirs(numpylogdir)
    logger.info("writing samples to %s", logdir)

    # write config out
    sampling_file = os.path.join(logdir, "sampling_config.yaml")
    sampling_conf = vars(opt)

    with open(sampling_file, 'w') as f:
        yaml.dump(sampling_conf, f, default_flow_style=False)
    logger.debug("sampling settings: %s", sampling_conf)


    run(model, imglogdir, eta=opt.eta,
        vanilla=opt.vanilla_sample,  n_samples=opt.n_samples, custom_steps=opt.custom_steps,
        batch_size=opt.batch_size, nplog=numpylogdir)

    logger.info("done")
