"""Similarity search in the representation space (Appendix B.1, Figure 7).

"Finding semantically similar images [...] corresponds to finding nearby data points in the
2048 dimensional representation space [...] by taking the cosine similarity (i.e. the
normalized dot product) of the query vector and all other representations, and sorting by
decreasing value." Here the vectors are L2-normalised float32 and the cosine similarity is
their inner product, searched with faiss:

* ``flat``: ``IndexFlatIP``, exact (the paper's brute-force search; the default);
* ``ivf``: ``IndexIVFFlat``, inner product, ``nlist`` k-means cells of which ``nprobe`` are
  visited per query; approximate;
* ``hnsw``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT``, ``M`` links per node;
  approximate.

``benchmarks/bench_search.py`` compares their speed and recall against numpy. The anomaly
score of a galaxy is its cosine distance to its k-th nearest other galaxy
(:func:`anomaly_scores`): isolated galaxies score high.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import nn

from .constants import CROP_SIZE, N_BANDS
from .representations import Representations, encode, l2_normalize, rows_of_objids

log = logging.getLogger(__name__)

#: faiss index kinds of :class:`SimilarityIndex` (``representations.search_index``).
INDEX_KINDS: tuple[str, ...] = ("flat", "ivf", "hnsw")
#: Ways to name queries in :meth:`SimilarityIndex.search`.
QUERY_KINDS: tuple[str, ...] = ("index", "objid", "image", "vector")


@dataclass
class SearchResult:
    """The k nearest galaxies of Q queries, most similar first.

    indices: (Q, k) int64 rows of the index (-1 where an approximate index found fewer).
    objids: (Q, k) int64 ObjIDs of those galaxies (-1 likewise).
    similarity: (Q, k) float32 cosine similarities (NaN likewise).
    queries: (Q,) int64 row of each query galaxy, -1 for image and vector queries.
    """

    indices: np.ndarray
    objids: np.ndarray
    similarity: np.ndarray
    queries: np.ndarray


def set_faiss_threads(n: int | None = None) -> int:
    """Let faiss use ``n`` threads (default: torch's, i.e. the physical cores); returns it."""
    n = n or torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    return n


class SimilarityIndex:
    """Cosine-similarity search over the representations of a set of galaxies.

    data: a :class:`Representations`, or an (N, D) array of vectors (then ``objids``, default
        ``0..N-1``). Vectors are L2-normalised here; the faiss index holds the one float32
        copy (N x D x 4 bytes: 10.6 GB for 1.3M x 2048) and gives back rows for queries by
        index or ObjID.
    kind: ``flat`` (exact), ``ivf`` or ``hnsw`` (approximate; module docstring).
    nlist: IVF cells (default ``4 sqrt(N)``, at most N). nprobe: IVF cells visited per query.
    train_size: galaxies the IVF k-means is trained on, drawn with ``seed`` (default
        ``min(N, 64 nlist)``).
    hnsw_m: HNSW links per node (M). ef_construction, ef_search: HNSW candidate-list sizes
        when building and searching (larger: slower and more exact).
    encoder: the network that made the vectors, needed to query by image (:func:`encode`,
        centre crop ``crop_size``).
    seed: seed of the IVF training sample and k-means.
    threads: faiss threads (default: torch's).
    """

    def __init__(self, data, objids=None, *, kind: str = "flat", nlist: int | None = None, nprobe: int = 8,
                 train_size: int | None = None, hnsw_m: int = 32, ef_construction: int = 80,
                 ef_search: int = 64, encoder: nn.Module | None = None, crop_size: int = CROP_SIZE,
                 seed: int = 0, threads: int | None = None):
        if isinstance(data, Representations):
            vectors, objids = data.vectors, data.objids if objids is None else objids
        else:
            vectors = data
        vectors = l2_normalize(vectors)  # (N, D) float32
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"SimilarityIndex needs an (N, D) array with N >= 1, got shape {vectors.shape}")
        n, d = vectors.shape
        objids = np.arange(n, dtype=np.int64) if objids is None else np.asarray(objids, dtype=np.int64)
        if kind not in INDEX_KINDS:
            raise ValueError(f"kind must be one of {INDEX_KINDS}, got {kind!r}")
        if objids.shape != (n,):
            raise ValueError(f"{n} vectors but objids of shape {objids.shape}")
        self.objids, self.dim = objids, d
        self._order = np.argsort(objids, kind="stable")
        self.kind, self.encoder, self.crop_size = kind, encoder, crop_size
        set_faiss_threads(threads)
        if kind == "flat":
            self.index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = min(n, nlist or max(1, round(4 * math.sqrt(n))))
            if nprobe < 1:
                raise ValueError(f"nprobe must be >= 1, got {nprobe}")
            self._quantizer = faiss.IndexFlatIP(d)
            self.index = faiss.IndexIVFFlat(self._quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index.cp.seed = seed
            m = min(n, train_size or 64 * nlist)
            sample = np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))
            self.index.train(vectors[sample])
            self.index.nprobe = min(nprobe, nlist)
        else:
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = ef_construction
            self.index.hnsw.efSearch = ef_search
        self.index.add(vectors)
        if kind == "ivf":
            self.index.make_direct_map()  # rows can be read back (reconstruct)

    def __len__(self) -> int:
        return self.index.ntotal

    def vectors(self, rows) -> np.ndarray:
        """The L2-normalised float32 vectors of these rows, (len(rows), D)."""
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64).reshape(-1))

    def index_of(self, objids) -> np.ndarray:
        """Rows of these ObjIDs; KeyError naming any that are not in the index."""
        return rows_of_objids(self.objids, objids, self._order, where=" in the index")

    # -- queries
    def _query_vectors(self, queries, by: str) -> tuple[np.ndarray, np.ndarray]:
        """(vectors (Q, D) normalised, rows (Q,) of query galaxies or -1)."""
        if by == "index":
            rows = np.asarray(queries).reshape(-1)
            if rows.size and rows.dtype.kind not in "iu":
                raise ValueError(f"queries by index must be integers, got dtype {rows.dtype}")
            rows = rows.astype(np.int64)
            bad = rows[(rows < 0) | (rows >= len(self))]
            if bad.size:
                raise IndexError(f"galaxy indices out of range [0, {len(self)}): {bad[:10].tolist()}")
            return self.vectors(rows), rows
        if by == "objid":
            ids = np.asarray(queries).reshape(-1)
            if ids.size and ids.dtype.kind not in "iu":
                raise ValueError(f"ObjIDs must be integers (floats lose their last digits), got {ids.dtype}")
            rows = self.index_of(ids)
            return self.vectors(rows), rows
        if by == "vector":
            v = np.asarray(queries, dtype=np.float32)
            v = v[None] if v.ndim == 1 else v
            if v.ndim != 2 or v.shape[1] != self.dim:
                raise ValueError(f"vector queries need shape (Q, {self.dim}), got {v.shape}")
            return l2_normalize(v), np.full(len(v), -1, np.int64)
        # by == "image"
        if self.encoder is None:
            raise ValueError("querying by image needs the encoder: SimilarityIndex(..., encoder=...)")
        images = torch.as_tensor(queries)
        images = images[None] if images.ndim == 3 else images
        if (images.ndim != 4 or images.shape[1] != N_BANDS or min(images.shape[-2:]) < self.crop_size
                or not images.is_floating_point()):
            raise ValueError(f"image queries need a float tensor (B, {N_BANDS}, H, W) with H, W >= "
                             f"{self.crop_size}, got {images.dtype} {tuple(images.shape)}")
        v = encode(self.encoder, images, self.crop_size).numpy()  # (B, D)
        if v.shape[1] != self.dim:
            raise ValueError(f"the encoder gives {v.shape[1]}-d vectors but the index holds "
                             f"{self.dim}-d ones: is it the encoder that made them?")
        return l2_normalize(v), np.full(len(v), -1, np.int64)

    def search(self, queries, k: int, by: str = "index", exclude_self: bool = True) -> SearchResult:
        """The ``k`` galaxies most similar to each query, most similar first.

        queries: galaxy rows (``by="index"``), ObjIDs (``by="objid"``), images, a float
            (B, 5, H, W) or (5, H, W) tensor or array (``by="image"``; any floating-point
            ``queries`` are taken as images), or representation vectors (``by="vector"``).
        exclude_self: a query galaxy (by index or ObjID) is not its own neighbour. Image and
            vector queries exclude nothing: a galaxy's own image finds itself first, with
            similarity ~1.

        Raises ValueError for k < 1 or k above the galaxies available, IndexError for a row
        out of range, KeyError for an unknown ObjID, ValueError for an image of another shape.
        """
        if by not in QUERY_KINDS:
            raise ValueError(f"by must be one of {QUERY_KINDS}, got {by!r}")
        floating = (queries.is_floating_point() if torch.is_tensor(queries)
                    else np.asarray(queries).dtype.kind == "f")
        if by == "index" and floating:
            by = "image"
        skip = exclude_self and by in ("index", "objid")
        available = len(self) - int(skip)
        if not 1 <= k <= available:
            minus = f" ({len(self)} minus the query itself)" if skip else ""
            raise ValueError(f"k must be between 1 and the {available} galaxies available{minus}, got k={k}")
        vectors, rows = self._query_vectors(queries, by)
        sim, idx = self.index.search(np.ascontiguousarray(vectors), k + int(skip))  # (Q, k [+1])
        if skip:
            sim, idx = _drop_self(sim, idx, rows)
        objids = np.where(idx >= 0, self.objids[np.maximum(idx, 0)], -1)
        sim = np.where(idx >= 0, sim, np.nan).astype(np.float32)
        return SearchResult(indices=idx.astype(np.int64), objids=objids, similarity=sim, queries=rows)


def _drop_self(sim: np.ndarray, idx: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its (k + 1) neighbours (the last one if absent)."""
    is_self = idx == rows[:, None]  # (Q, k + 1)
    is_self[~is_self.any(axis=1), -1] = True
    keep = ~is_self
    shape = (idx.shape[0], idx.shape[1] - 1)
    return sim[keep].reshape(shape), idx[keep].reshape(shape)


def index_from_config(reps: Representations, cfg, encoder: nn.Module | None = None, crop_size: int = CROP_SIZE,
                      seed: int = 0) -> SimilarityIndex:
    """The index a profile's ``representations`` section asks for (``search_index``,
    ``ivf_nlist``, ``ivf_nprobe``, ``hnsw_m``)."""
    return SimilarityIndex(reps, kind=cfg.search_index, nlist=cfg.ivf_nlist, nprobe=cfg.ivf_nprobe,
                           hnsw_m=cfg.hnsw_m, encoder=encoder, crop_size=crop_size, seed=seed)


# ----------------------------------------------------------------------------- references, scores
def brute_force_search(vectors, queries, k: int, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine search in numpy, the reference for faiss: normalised matrix products and
    ``argpartition``, ``batch_size`` queries at a time. Returns (indices (Q, k) int64,
    similarities (Q, k) float32), most similar first. Nothing is excluded."""
    base = l2_normalize(vectors)  # (N, D)
    q = l2_normalize(queries)
    q = q[None] if q.ndim == 1 else q
    if not 1 <= k <= base.shape[0]:
        raise ValueError(f"k must be between 1 and the {base.shape[0]} vectors, got k={k}")
    out_idx = np.empty((q.shape[0], k), np.int64)
    out_sim = np.empty((q.shape[0], k), np.float32)
    for s in range(0, q.shape[0], batch_size):
        sim = q[s:s + batch_size] @ base.T  # (b, N)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k] if k < base.shape[0] else \
            np.broadcast_to(np.arange(k), (sim.shape[0], k))
        top_sim = np.take_along_axis(sim, top, axis=1)
        order = np.argsort(-top_sim, axis=1, kind="stable")
        out_idx[s:s + batch_size] = np.take_along_axis(top, order, axis=1)
        out_sim[s:s + batch_size] = np.take_along_axis(top_sim, order, axis=1)
    return out_idx, out_sim


def recall_at_k(approx_indices, exact_indices) -> float:
    """Mean fraction of each row's exact k neighbours that the approximate search found."""
    approx, exact = np.asarray(approx_indices), np.asarray(exact_indices)
    if approx.shape != exact.shape or approx.ndim != 2:
        raise ValueError(f"recall_at_k needs two (Q, k) arrays of one shape, got {approx.shape} and {exact.shape}")
    hits = [np.intersect1d(a[a >= 0], e).size for a, e in zip(approx, exact)]
    return float(np.sum(hits) / exact.size) if exact.size else float("nan")


def anomaly_scores(index: SimilarityIndex, k: int, batch_size: int = 4096, progress: bool = False) -> np.ndarray:
    """Cosine distance ``1 - similarity`` of every galaxy to its k-th nearest other galaxy, (N,).

    Galaxies in sparse regions of the representation space score high. Searched
    ``batch_size`` galaxies at a time with ``index`` (use ``ivf`` or ``hnsw`` for millions:
    an exact search of N queries costs N^2 D).
    """
    from tqdm.auto import tqdm

    n = len(index)
    scores = np.empty(n, np.float32)
    for s in tqdm(range(0, n, batch_size), disable=not progress, desc="anomaly scores"):
        rows = np.arange(s, min(n, s + batch_size))
        res = index.search(rows, k)
        scores[rows] = 1.0 - res.similarity[:, k - 1]
    return scores


# ----------------------------------------------------------------------------- a profile's search
def example_queries(dataset, n: int, seed: int, candidates_per_query: int = 10,
                    crop_size: int = CROP_SIZE) -> np.ndarray:
    """The example galaxies of Figures 7 and 9, chosen by one reproducible rule.

    The paper hand-picked ten galaxies for its similarity search (Figure 7) and followed the
    same ten under augmentations (Figure 9). Here: ``min(N, candidates_per_query * n)``
    galaxies are drawn without replacement by ``numpy.random.default_rng(seed)``, each one's
    r-band flux inside the ``crop_size`` centre crop (what the network sees) is summed, and
    the ``n`` at evenly spaced brightness ranks are kept, from the brightest candidate to the
    faintest, so the examples span the survey's range of brightness and size rather than
    showing only its many small, faint galaxies. Only the images are read (no catalogue
    column), so the rule works on the authors' files and on the mock alike.

    dataset: a :class:`sdsscl.data.SurveyDataset`. Returns (n,) int64 positions in it,
    brightest first (the row order of Figure 7).
    """
    from .constants import R_BAND

    size = len(dataset)
    if not 1 <= n <= size:
        raise ValueError(f"example_queries: n must be between 1 and the {size} galaxies, got {n}")
    if candidates_per_query < 1:
        raise ValueError(f"example_queries: candidates_per_query must be >= 1, got {candidates_per_query}")
    m = min(size, candidates_per_query * n)
    candidates = np.sort(np.random.default_rng(seed).choice(size, size=m, replace=False))
    lo = None
    flux = np.empty(m, np.float64)
    for k, row in enumerate(candidates):
        image = dataset[int(row)]["image"]                                         # (5, H, W)
        if lo is None:
            lo = (image.shape[-1] - crop_size) // 2                                # the centre crop's corner
        flux[k] = float(image[R_BAND, lo:lo + crop_size, lo:lo + crop_size].double().sum())
    by_brightness = candidates[np.argsort(-flux, kind="stable")]
    ranks = np.unique(np.round(np.linspace(0, m - 1, n)).astype(np.int64))
    return by_brightness[ranks].astype(np.int64)


def find_similar(profile, queries, *, by: str = "index", k: int | None = None, runs_dir=None):
    """Figure 7 for a profile: the ``k`` galaxies most similar to each query galaxy.

    queries: positions in the profile's survey (``by="index"``) or ObjIDs (``by="objid"``).

    Reads the run's representations (:func:`sdsscl.representations.run_extraction`), checked
    against the profile's galaxies, searches them with the profile's index
    (``representations.search_index``) and draws :func:`sdsscl.plotting.similarity_grid`.
    ``k`` defaults to ``representations.neighbours``. Returns (SearchResult, Figure).
    """
    from .plotting import similarity_grid
    from .provenance import run_paths
    from .representations import (
        load_representations,
        profile_dataset,
        representations_path,
    )

    if by not in ("index", "objid"):
        raise ValueError(f"find_similar queries galaxies of the survey by 'index' or 'objid', got {by!r}")
    paths = run_paths(profile, runs_dir)
    if not representations_path(paths).is_file():  # before reading the survey: the likelier gap
        raise FileNotFoundError(f"no representations file at {representations_path(paths)}; "
                                f"scripts/extract_representations.py --profile {profile.name} writes it")
    dataset = profile_dataset(profile, paths)
    index = index_from_config(load_representations(representations_path(paths), dataset),
                              profile.representations, crop_size=profile.augment.crop_size, seed=profile.seed)
    result = index.search(queries, k or profile.representations.neighbours, by=by)
    if (result.indices < 0).any():
        raise ValueError(f"the {index.kind} index found fewer than k neighbours for some queries; "
                         f"raise representations.ivf_nprobe or use search_index=flat")
    q_images = torch.stack([dataset[int(r)]["image"] for r in result.queries])  # (Q, 5, H, W)
    n_images = torch.stack([torch.stack([dataset[int(r)]["image"] for r in row])
                            for row in result.indices])  # (Q, k, 5, H, W)
    titles = [f"ObjID {o}" for o in index.objids[result.queries]]
    fig = similarity_grid(q_images, n_images, result.similarity, titles=titles,
                          crop_size=profile.augment.crop_size)
    return result, fig
