import logging
import os, sys
import numpy as np
import importlib.util
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's ldm, installed (pip install -e .) or not
from ldm.script_helpers import ArgumentParser, check_output_dir, configure_logging, positive_int
from ldm.util import first_line, load_retrieval_database

logger = logging.getLogger("train_searcher")


def search_bruteforce(searcher):
    return searcher.score_brute_force().build()


def search_partioned_ah(searcher, dims_per_block, aiq_threshold, reorder_k,
                        partioning_trainsize, num_leaves, num_leaves_to_search):
    return searcher.tree(num_leaves=num_leaves,
                         num_leaves_to_search=num_leaves_to_search,
                         training_sample_size=partioning_trainsize). \
        score_ah(dims_per_block, anisotropic_quantization_threshold=aiq_threshold).reorder(reorder_k).build()


def search_ah(searcher, dims_per_block, aiq_threshold, reorder_k):
    return searcher.score_ah(dims_per_block, anisotropic_quantization_threshold=aiq_threshold).reorder(
        reorder_k).build()

def train_searcher(opt,
                   metric='dot_product',
                   partioning_trainsize=None,
                   reorder_k=None,
                   # todo tune
                   aiq_thld=0.2,
                   dims_per_block=2,
                   num_leaves=None,
                   num_leaves_to_search=None,):

    data_pool = load_retrieval_database(opt.database)
    k = opt.knn

    if not reorder_k:
        reorder_k = 2 * k

    # normalize
    # embeddings =
    searcher = scann.scann_ops_pybind.builder(data_pool['embedding'] / np.linalg.norm(data_pool['embedding'], axis=1)[:, np.newaxis], k, metric)
    pool_size = data_pool['embedding'].shape[0]

    logger.info('Initializing scaNN searcher with the following values:')
    logger.info(f'k: {k}')
    logger.info(f'metric: {metric}')
    logger.info(f'reorder_k: {reorder_k}')
    logger.info(f'anisotropic_quantization_threshold: {aiq_thld}')
    logger.info(f'dims_per_block: {dims_per_block}')
    logger.info('Start training searcher....')
    logger.info(f'N samples in pool is {pool_size}')

    # this reflects the recommended design choices proposed at
    # https://github.com/google-research/google-research/blob/aca5f2e44e301af172590bb8e65711f0c9ee0cfd/scann/docs/algorithms.md
    if pool_size < 2e4:
        logger.info('Using brute force search.')
        searcher = search_bruteforce(searcher)
    elif 2e4 <= pool_size and pool_size < 1e5:
        logger.info('Using asymmetric hashing search and reordering.')
        searcher = search_ah(searcher, dims_per_block, aiq_thld, reorder_k)
    else:
        logger.info('Using using partioning, asymmetric hashing search and reordering.')

        if not partioning_trainsize:
            partioning_trainsize = data_pool['embedding'].shape[0] // 10
        if not num_leaves:
            num_leaves = int(np.sqrt(pool_size))

        if not num_leaves_to_search:
            num_leaves_to_search = max(num_leaves // 20, 1)

        logger.info('Partitioning params:')
        logger.info(f'num_leaves: {num_leaves}')
        logger.info(f'num_leaves_to_search: {num_leaves_to_search}')
        # self.searcher = self.search_ah(searcher, dims_per_block, aiq_thld, reorder_k)
        searcher = search_partioned_ah(searcher, dims_per_block, aiq_thld, reorder_k,
                                                 partioning_trainsize, num_leaves, num_leaves_to_search)

    logger.info('Finish training searcher')
    searcher_savedir = opt.target_path
    os.makedirs(searcher_savedir, exist_ok=True)
    searcher.serialize(searcher_savedir)
    logger.info(f'Saved trained searcher under "{searcher_savedir}"')

if __name__ == '__main__':
    configure_logging()
    parser = ArgumentParser()
    parser.add_argument('--database',
                        '-d',
                        default='data/rdm/retrieval_databases/openimages',
                        type=str,
                        help='path to folder containing the clip feature of the database')
    parser.add_argument('--target_path',
                        '-t',
                        default='data/rdm/searchers/openimages',
                        type=str,
                        help='path to the target folder where the searcher shall be stored.')
    parser.add_argument('--knn',
                        '-k',
                        default=20,
                        type=positive_int,
                        help='number of nearest neighbors, for which the searcher shall be optimized')

    opt = parser.parse_args()
    if os.path.isdir(opt.target_path) and os.listdir(opt.target_path):  # an earlier searcher: kept, not mixed with
        parser.error(f"--target_path {opt.target_path} is not empty: give a new folder, or remove that one to "
                     f"rebuild its searcher")
    check_output_dir(parser, "--target_path", opt.target_path)  # a bad one was found only after the training
    if importlib.util.find_spec("scann") is None:
        raise SystemExit("error: this script needs the optional package scann (pip install scann)")
    import scann

    try:
        train_searcher(opt)
    except (FileNotFoundError, ValueError) as e:  # no .npz files, or files that do not fit together
        parser.error(f"--database {opt.database} (the folder of CLIP features to index): {first_line(e)}")