import os, sys, glob, logging
import importlib.util
import torch
import numpy as np
from tqdm import tqdm, trange
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's ldm, installed (pip install -e .) or not
from ldm.util import first_line, load_retrieval_database, pip_name
from ldm.checkpoints import CheckpointError
from ldm.hub import ModelUnavailable
from ldm.model_choice import read_model_geometry
from ldm.modules.encoders.modules import FrozenCLIPTextEmbedder
from ldm.outputs import OutputWriter
from ldm.script_helpers import (SAMPLERS, ArgumentParser, build_model, check_eta, check_image_size, check_n_rows,
                                check_sample_outdir, check_sampler_steps, check_scale, check_steps, configure_logging,
                                make_sampler, positive_int, prompt_batches, read_prompts, resolve_sampler)

logger = logging.getLogger("knn2img")

SAMPLER_ALIASES = {"plms": "plms"}  # upstream's flag here, kept as an alias of --sampler plms
DEFAULT_DATABASE = "artbench-surrealism"
DEFAULT_KNN = 10

DATABASES = [
    "openimages",
    "artbench-art_nouveau",
    "artbench-baroque",
    "artbench-expressionism",
    "artbench-impressionism",
    "artbench-post_impressionism",
    "artbench-realism",
    "artbench-romanticism",
    "artbench-renaissance",
    "artbench-surrealism",
    "artbench-ukiyo_e",
]


def database_folder(database):
    return f'data/rdm/retrieval_databases/{database}'


#: below this many entries a database without a trained searcher gets a brute-force one on the fly
#: (as train_searcher.py builds for them too); a larger one needs train_searcher.py first
ON_THE_FLY_ENTRIES = 20_000


class Searcher(object):
    def __init__(self, database):
        assert database in DATABASES
        self.database_name = database
        self.searcher_savedir = f'data/rdm/searchers/{self.database_name}'
        self.database_path = database_folder(database)
        self.database = load_retrieval_database(self.database_path)
        self.searcher = self.load_searcher()

    def train_searcher(self, k, metric='dot_product'):

        import scann
        logger.info('Start training searcher')
        searcher = scann.scann_ops_pybind.builder(self.database['embedding'] /
                                                  np.linalg.norm(self.database['embedding'], axis=1)[:, np.newaxis],
                                                  k, metric)
        self.searcher = searcher.score_brute_force().build()
        logger.info('Finish training searcher')

    def load_searcher(self):
        """The trained searcher of the database, or None for a small one without (search fits it)."""
        entries = len(self.database['embedding'])
        if not os.path.isdir(self.searcher_savedir):
            if entries < ON_THE_FLY_ENTRIES:
                return None
            raise FileNotFoundError(f"no searcher in {self.searcher_savedir} for this database of {entries} entries: "
                                    f"build it with python3 scripts/train_searcher.py -d {self.database_path} "
                                    f"-t {self.searcher_savedir}")
        import scann
        logger.info(f'load searcher for database {self.database_name} from {self.searcher_savedir}')
        searcher = scann.scann_ops_pybind.load_searcher(self.searcher_savedir)
        logger.info('Finished loading searcher.')
        return searcher

    def search(self, x, k):
        """The k database embeddings nearest to each query's, at unit length: (B, k, D)."""
        if self.searcher is None:
            self.train_searcher(k)   # quickly fit searcher on the fly for small databases
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if len(x.shape) == 3:
            x = x[:, 0]
        query_embeddings = x / np.linalg.norm(x, axis=1)[:, np.newaxis]
        nns, _ = self.searcher.search_batched(query_embeddings, final_num_neighbors=k)
        found = self.database['embedding'][nns]
        return found / np.linalg.norm(found, axis=-1)[..., np.newaxis]

    def __call__(self, x, n):
        return self.search(x, n)


RDM_WEIGHTS = "models/rdm/rdm768x768/model.ckpt"
RDM_WEIGHTS_URL = "https://ommer-lab.com/files/rdm/model.ckpt"  # latent-diffusion's README


def validate(parser, opt):
    """Every check that needs no model, so that bad input costs one line, not a CLIP and model load."""
    for flag, path in (("--config", opt.config), ("--ckpt", opt.ckpt)):
        if not os.path.isfile(path):
            hint = f" (upstream's weights: wget -O {RDM_WEIGHTS} {RDM_WEIGHTS_URL})" if path == RDM_WEIGHTS else ""
            parser.error(f"{flag} {path} not found{hint}")
    opt.geometry = read_model_geometry(parser, "--config", opt.config)
    check_steps(parser, "--ddim_steps", opt.ddim_steps, opt.geometry.timesteps)
    check_image_size(parser, opt.H, opt.W, opt.geometry.multiple)
    resolve_sampler(parser, opt, SAMPLERS, SAMPLER_ALIASES)
    check_sampler_steps(parser, opt.sampler, SAMPLERS[opt.sampler], opt.ddim_steps)
    check_eta(parser, opt.ddim_eta, None if SAMPLERS[opt.sampler].stochastic else f"--sampler {opt.sampler}")
    check_scale(parser, opt.scale)
    check_n_rows(parser, opt.n_rows)
    if opt.n_rows and opt.skip_grid:
        logger.warning("--n_rows %d lays out the grid, which --skip_grid leaves out: it has no effect", opt.n_rows)
    retrieval = {"--database": opt.database, "--knn": opt.knn}
    if not opt.use_neighbors and any(value is not None for value in retrieval.values()):
        logger.warning("%s only applies with --use_neighbors: without it the prompt alone conditions the model",
                       " and ".join(flag for flag, value in retrieval.items() if value is not None))
    opt.database = opt.database or DEFAULT_DATABASE
    opt.knn = opt.knn or DEFAULT_KNN
    opt.prompt = None if opt.prompt is None else [opt.prompt]
    opt.prompts = read_prompts(parser, opt)
    folder = database_folder(opt.database)
    if opt.use_neighbors and not glob.glob(os.path.join(folder, "*.npz")):
        parser.error(f"--database {opt.database}: no .npz files in {folder}; put upstream's retrieval databases "
                     "in data/rdm/retrieval_databases (latent-diffusion's README, \"RDM with text-to-image retrieval\")")
    check_sample_outdir(parser, opt)  # last: created only when the input is good


if __name__ == "__main__":
    configure_logging()
    parser = ArgumentParser()
    # TODO: add n_neighbors and modes (text-only, text-image-retrieval, image-image retrieval etc)
    # TODO: add 'image variation' mode when knn=0 but a single image is given instead of a text prompt?
    parser.add_argument(
        "--prompt",
        type=str,
        nargs="?",
        help="the prompt to render (default: a painting of a virus monster playing guitar)"
    )

    parser.add_argument(
        "--outdir",
        type=str,
        nargs="?",
        help="dir to write results to",
        default="outputs/txt2img-samples"
    )

    parser.add_argument(
        "--skip_grid",
        action='store_true',
        help="do not save a grid, only individual samples. Helpful when evaluating lots of samples",
    )

    parser.add_argument(
        "--ddim_steps",
        type=positive_int,
        default=50,
        help="number of ddim sampling steps",
    )

    parser.add_argument(
        "--n_repeat",
        type=positive_int,
        default=1,
        help="how many times the prompt's CLIP embedding stands in the conditioning",
    )

    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="sampling method (default: ddim)")
    parser.add_argument("--plms", action='store_true', help="same as --sampler plms (upstream flag)")

    parser.add_argument(
        "--ddim_eta",
        type=float,
        default=0.0,
        help="ddim eta (eta=0.0 corresponds to deterministic sampling",
    )
    parser.add_argument(
        "--n_iter",
        type=positive_int,
        default=1,
        help="sample this often",
    )

    parser.add_argument(
        "--H",
        type=int,
        default=768,
        help="image height, in pixel space",
    )

    parser.add_argument(
        "--W",
        type=int,
        default=768,
        help="image width, in pixel space",
    )

    parser.add_argument(
        "--n_samples",
        type=positive_int,
        default=3,
        help="how many samples to produce for each given prompt. A.k.a batch size",
    )

    parser.add_argument(
        "--n_rows",
        type=int,
        default=0,
        help="images per grid row (default: n_samples)",
    )

    parser.add_argument(
        "--scale",
        type=float,
        default=5.0,
        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - eps(x, empty))",
    )

    parser.add_argument(
        "--from-file",
        type=str,
        help="if specified, load prompts from this file",
    )

    parser.add_argument(
        "--config",
        type=str,
        default="configs/retrieval-augmented-diffusion/768x768.yaml",
        help="path to config which constructs model",
    )

    parser.add_argument(
        "--ckpt",
        type=str,
        default="models/rdm/rdm768x768/model.ckpt",
        help="path to checkpoint of model",
    )

    parser.add_argument(
        "--clip_type",
        type=str,
        default="ViT-L/14",
        help="which CLIP model encodes the prompt (a name, or the path of its .pt file)",
    )
    parser.add_argument(
        "--database",
        type=str,
        default=None,
        choices=DATABASES,
        help=f"The database used for the search, only applied with --use_neighbors (default: {DEFAULT_DATABASE})",
    )
    parser.add_argument(
        "--use_neighbors",
        default=False,
        action='store_true',
        help="Include neighbors in addition to text prompt for conditioning",
    )
    parser.add_argument(
        "--knn",
        default=None,
        type=positive_int,
        help=f"The number of included neighbors, only applied with --use_neighbors (default: {DEFAULT_KNN})",
    )
    parser.add_argument("--unsafe-pickle", action="store_true",
                        help="allow full unpickling of a TRUSTED .ckpt, and a --clip_type file "
                             "(can run arbitrary code)")

    opt = parser.parse_args()

    # optional packages (not in the fork's requirements): CLIP always, ScaNN for retrieval
    for package in ("clip", "scann") if opt.use_neighbors else ("clip",):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"error: this script needs the optional package {package} "
                             f"(pip install {pip_name(package)})")
    validate(parser, opt)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:  # before the model: CLIP's weights and the database are what may be missing
        clip_text_encoder = FrozenCLIPTextEmbedder(opt.clip_type, n_repeat=opt.n_repeat,
                                                   unsafe_pickle=opt.unsafe_pickle).to(device)  # tokens follow
        searcher = Searcher(opt.database) if opt.use_neighbors else None
    except (ModelUnavailable, CheckpointError) as e:
        raise SystemExit(f"error: {e} (--clip_type)")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --database {opt.database}: {first_line(e)}")

    model = build_model(opt.config, opt.ckpt, unsafe_pickle=opt.unsafe_pickle).to(device)  # strict, as txt2img

    sampler = make_sampler(opt, model, SAMPLERS)

    outpath = opt.outdir

    n_rows = opt.n_rows if opt.n_rows > 0 else opt.n_samples
    data = prompt_batches(opt)

    # numbered after the files already there, never overwriting one (upstream counted the files, so a
    # gap in the numbering made it write over the highest ones)
    writer = OutputWriter(outpath)

    logger.info(f"sampling scale for cfg is {opt.scale:.2f}")

    with torch.no_grad():
        with model.ema_scope():
            for n in trange(opt.n_iter, desc="Sampling"):
                all_samples = list()
                for prompts in tqdm(data, desc="data"):
                    logger.info("sampling prompts: %s", prompts)
                    c = clip_text_encoder.encode(prompts)
                    uc = None
                    if searcher is not None:
                        c = torch.cat([c, torch.from_numpy(searcher(c, opt.knn)).to(c)], dim=1)
                    if opt.scale != 1.0:
                        uc = torch.zeros_like(c)
                    shape = [opt.geometry.channels, opt.H // opt.geometry.factor, opt.W // opt.geometry.factor]
                    samples_ddim, _ = sampler.sample(S=opt.ddim_steps,
                                                     conditioning=c,
                                                     batch_size=c.shape[0],
                                                     shape=shape,
                                                     verbose=False,
                                                     unconditional_guidance_scale=opt.scale,
                                                     unconditional_conditioning=uc,
                                                     eta=opt.ddim_eta,
                                                     )

                    x_samples_ddim = model.decode_first_stage(samples_ddim)
                    x_samples_ddim = torch.clamp((x_samples_ddim + 1.0) / 2.0, min=0.0, max=1.0)

                    writer.save_samples(x_samples_ddim, lambda i: None)
                    all_samples.append(x_samples_ddim)

                if not opt.skip_grid:
                    writer.save_grid(torch.cat(all_samples), n_rows, None)

    logger.info(f"Your samples are ready and waiting for you here: {outpath}")
