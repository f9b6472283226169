"""Stand-in for Google's `scann` package (not installed here), next to the clip stand-in: the
calls knn2img makes of it (builder(...).score_brute_force().build(), search_batched, serialize,
scann_ops_pybind.load_searcher), as an exact dot-product search."""
import os
import types

import numpy as np


class _Searcher:
    def __init__(self, database, k):
        self.database, self.k = np.asarray(database, np.float32), k

    def search_batched(self, queries, final_num_neighbors=None):
        scores = np.asarray(queries, np.float32) @ self.database.T
        nns = np.argsort(-scores, axis=1, kind="stable")[:, :final_num_neighbors or self.k]
        return nns, np.take_along_axis(scores, nns, axis=1)

    def serialize(self, folder):
        np.save(os.path.join(folder, "database.npy"), self.database)


class _Builder:
    def __init__(self, database, k, metric):
        self.database, self.k = database, k

    def score_brute_force(self):
        return self

    def build(self):
        return _Searcher(self.database, self.k)


def _load_searcher(folder):
    path = os.path.join(folder, "database.npy")
    if not os.path.isfile(path):
        raise RuntimeError(f"Not found: {path}")
    return _Searcher(np.load(path), 10)


scann_ops_pybind = types.SimpleNamespace(builder=_Builder, load_searcher=_load_searcher)
