"""Similarity search: faiss against brute force, approximate recall, queries, errors, Figure 7."""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# the tiny survey and encoder of the representation tests (tests/ is on sys.path under pytest)
from test_representations import galaxy_images, one_thread, tiny_encoder, write_survey  # noqa: F401

from sdsscl.config import load_profile
from sdsscl.data import SurveyDataset
from sdsscl.plotting import similarity_grid
from sdsscl.representations import (
    Representations,
    extract_representations,
    load_representations,
)
from sdsscl.search import example_queries  # noqa: E402
from sdsscl.search import (
    SimilarityIndex,
    anomaly_scores,
    brute_force_search,
    index_from_config,
    recall_at_k,
)

log = logging.getLogger(__name__)


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.3) -> np.ndarray:
    """Gaussian clusters of random centres, like representations grouped by galaxy type."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    return (centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def assert_same_neighbours(a_idx, a_sim, b_idx, b_sim, tol: float = 1e-5) -> None:
    """Same similarities, and the same galaxies at every rank except where two tie within tol."""
    np.testing.assert_allclose(a_sim, b_sim, atol=tol)
    gaps = np.abs(np.diff(b_sim, axis=1)) < tol
    tied = np.zeros(b_idx.shape, bool)
    tied[:, :-1] |= gaps
    tied[:, 1:] |= gaps
    differ = np.asarray(a_idx) != np.asarray(b_idx)
    assert not (differ & ~tied).any(), np.argwhere(differ & ~tied)


# --------------------------------------------------------------------------- exact and approximate
def test_flat_index_equals_brute_force_cosine():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(500, 32)) * rng.uniform(0.1, 10, (500, 1))  # norms differ: cosine, not dot
    q = rng.normal(size=(20, 32))
    index = SimilarityIndex(v)
    res = index.search(q, 10, by="vector")
    ref_idx, ref_sim = brute_force_search(v, q, 10)
    assert_same_neighbours(res.indices, res.similarity, ref_idx, ref_sim)
    # an independent float64 reference
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ u.T
    np.testing.assert_array_equal(np.sort(res.indices, 1), np.sort(np.argsort(-cos, 1)[:, :10], 1))
    np.testing.assert_allclose(res.similarity, -np.sort(-cos, 1)[:, :10], atol=1e-5)
    # by index the galaxy itself is left out: brute force's k + 1 without its first (self) column
    rows = np.arange(0, 500, 37)
    by_index = index.search(rows, 10)
    self_idx, self_sim = brute_force_search(v, v[rows], 11)
    assert (self_idx[:, 0] == rows).all()
    assert_same_neighbours(by_index.indices, by_index.similarity, self_idx[:, 1:], self_sim[:, 1:])
    assert (by_index.indices != rows[:, None]).all() and by_index.queries.tolist() == rows.tolist()
    kept = index.search(rows, 10, exclude_self=False)
    assert (kept.indices[:, 0] == rows).all() and np.allclose(kept.similarity[:, 0], 1, atol=1e-6)


@pytest.mark.parametrize("kind, options", [("ivf", {"nlist": 64, "nprobe": 16}),
                                           ("hnsw", {"hnsw_m": 16, "ef_search": 128})])
def test_approximate_indexes_have_high_recall_on_clustered_vectors(kind, options):
    v = clustered(4000, 32, clusters=40, spread=1.0)  # overlapping clusters: a real test
    rows = np.arange(0, 4000, 20)
    exact = SimilarityIndex(v).search(rows, 10)
    approx = SimilarityIndex(v, kind=kind, seed=1, **options).search(rows, 10)
    recall = recall_at_k(approx.indices, exact.indices)
    log.info("%s %s: recall@10 = %.3f", kind, options, recall)
    assert recall > 0.9
    if kind == "ivf":  # seeded: the same index twice; fewer cells visited, lower recall
        again = SimilarityIndex(v, kind=kind, seed=1, **options).search(rows, 10)
        np.testing.assert_array_equal(again.indices, approx.indices)
        one_cell = SimilarityIndex(v, kind=kind, seed=1, nlist=64, nprobe=1).search(rows, 10)
        assert recall_at_k(one_cell.indices, exact.indices) < min(recall, 0.9)  # measured 0.82


def test_recall_at_k():
    exact = np.array([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(exact, exact) == 1.0
    assert recall_at_k([[3, 2, 9], [-1, -1, -1]], exact) == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="one shape"):
        recall_at_k(exact[:, :2], exact)


def test_anomaly_score_is_distance_to_kth_other_galaxy():
    v = clustered(300, 16, clusters=5, seed=2)
    v[123] = -v.mean(0) * 5 + 3 * np.random.default_rng(3).normal(size=16)  # far from every cluster
    scores = anomaly_scores(SimilarityIndex(v), k=3, batch_size=64)
    _, ref_sim = brute_force_search(v, v, 4)
    np.testing.assert_allclose(scores, 1 - ref_sim[:, 3], atol=1e-5)  # column 0 is the galaxy itself
    assert scores.shape == (300,) and scores.argmax() == 123


def test_index_from_a_profile_section():
    cfg = load_profile("smoke").representations
    v = clustered(200, 8, clusters=4)
    assert index_from_config(Representations(v, np.arange(200) + 7), cfg).kind == "flat"
    ivf = index_from_config(Representations(v, np.arange(200) + 7), replace(cfg, search_index="ivf"))
    assert ivf.index.nlist == cfg.ivf_nlist and ivf.index.nprobe == cfg.ivf_nprobe
    assert ivf.search([7], 3, by="objid").indices.shape == (1, 3)


# --------------------------------------------------------------------------- queries
def test_query_by_objid_index_and_own_image_agree(tmp_path):
    survey = write_survey(tmp_path / "survey.h5", n=40)
    encoder = tiny_encoder()
    dataset = SurveyDataset(survey)
    reps = load_representations(extract_representations(encoder, dataset, tmp_path / "r.h5", batch_size=8,
                                                         dtype="float32", progress=False), dataset)
    index = SimilarityIndex(reps, encoder=encoder)
    rows = np.array([3, 17, 38])
    by_index = index.search(rows, 5)
    by_objid = index.search(reps.objids[rows], 5, by="objid")
    images = torch.stack([dataset[int(r)]["image"] for r in rows])  # (3, 5, 107, 107)
    by_image = index.search(images, 6)  # floating point: taken as images; nothing excluded
    np.testing.assert_array_equal(by_objid.indices, by_index.indices)
    np.testing.assert_array_equal(by_objid.objids, reps.objids[by_index.indices])
    assert (by_image.indices[:, 0] == rows).all() and np.allclose(by_image.similarity[:, 0], 1, atol=1e-5)
    assert_same_neighbours(by_image.indices[:, 1:], by_image.similarity[:, 1:], by_index.indices,
                           by_index.similarity)
    assert by_image.queries.tolist() == [-1, -1, -1]
    one = index.search(images[0].numpy(), 6, by="image")  # a single (5, H, W) image, numpy
    np.testing.assert_array_equal(one.indices, by_image.indices[:1])


def test_bad_queries_raise_clear_errors(tmp_path):
    v = clustered(10, 64, clusters=2)
    objids = 1237648720693755904 + np.arange(10)
    index = SimilarityIndex(v, objids, encoder=tiny_encoder())
    with pytest.raises(ValueError, match=r"9 galaxies available \(10 minus the query itself\), got k=10"):
        index.search([0], 10)
    with pytest.raises(ValueError, match="got k=0"):
        index.search([0], 0)
    with pytest.raises(ValueError, match=r"10 galaxies available, got k=11"):
        index.search(torch.zeros(1, 5, 64, 64), 11)
    with pytest.raises(KeyError, match="1237648720693755999"):
        index.search([objids[0], 1237648720693755999], 3, by="objid")
    with pytest.raises(ValueError, match="integers"):
        index.search([1.2376487206937559e18], 3, by="objid")
    with pytest.raises(IndexError, match=r"\[0, 10\): \[10, -1\]"):
        index.search([2, 10, -1], 3)
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\).*\(2, 3, 107, 107\)"):
        index.search(torch.zeros(2, 3, 107, 107), 3)
    with pytest.raises(ValueError, match="H, W >= 64"):
        index.search(torch.zeros(2, 5, 32, 32), 3)
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        index.search(np.zeros((2, 64), np.float32), 3)  # vectors need by="vector"
    with pytest.raises(ValueError, match="by must be"):
        index.search([0], 3, by="name")
    with pytest.raises(ValueError, match="encoder"):
        SimilarityIndex(v).search(torch.zeros(1, 5, 64, 64), 3)
    with pytest.raises(ValueError, match="kind"):
        SimilarityIndex(v, kind="lsh")
    with pytest.raises(ValueError, match="k must be between 1 and the 10 vectors"):
        brute_force_search(v, v[:2], 11)


# --------------------------------------------------------------------------- Figure 7
def test_similarity_grid_draws_queries_and_neighbours():
    images = galaxy_images(8, seed=4)
    sims = np.array([[0.99, 0.95, 0.9], [0.98, 0.97, 0.5]])
    fig = similarity_grid(images[:2], images[2:].reshape(2, 3, 5, 107, 107), sims, titles=["a", "b"],
                          colors=["red", "blue"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4
    query = fig.axes[0]
    assert query.get_title() == "a" and query.spines["left"].get_edgecolor()[:3] == (1.0, 0.0, 0.0)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts == ["0.9900", "0.9500", "0.9000", "0.9800", "0.9700", "0.5000"]
    boxes = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
    assert len(boxes) == 8 and boxes[0].get_width() == 64 and boxes[0].get_xy() == (20.5, 20.5)
    fig.savefig(__import__("io").BytesIO(), format="png", dpi=30)
    with pytest.raises(ValueError, match="do not agree"):
        similarity_grid(images[:2], images[2:8].reshape(2, 3, 5, 107, 107), sims[:, :2])


def test_example_queries_span_brightness_reproducibly(tmp_path):
    ds = SurveyDataset(write_survey(tmp_path / "s.h5", n=40, seed=3))
    picks = example_queries(ds, n=4, seed=7, candidates_per_query=5)
    assert picks.dtype == np.int64 and len(set(picks.tolist())) == 4
    np.testing.assert_array_equal(picks, example_queries(ds, n=4, seed=7, candidates_per_query=5))
    r = np.array([ds[int(i)]["image"][2, 21:85, 21:85].sum().item() for i in range(len(ds))])
    assert list(r[picks]) == sorted(r[picks], reverse=True)      # brightest first
    # with every galaxy a candidate, the first pick is the brightest and the last the faintest
    every = example_queries(ds, n=4, seed=7, candidates_per_query=10)
    assert every[0] == np.argmax(r) and every[-1] == np.argmin(r)
    with pytest.raises(ValueError, match="between 1 and the 40 galaxies"):
        example_queries(ds, n=41, seed=0)
