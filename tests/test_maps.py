"""Tests of sdsscl.maps: UMAP maps, the image mosaic, stationarity under augmentations, the HTML map.

Every test builds small synthetic data in memory. The UMAP fits share one module fixture: the
first fit in a process spends ~10 s compiling umap-learn's numba code, later fits take <1 s.
"""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from sdsscl.augment import CenterCrop
from sdsscl.constants import CROP_SIZE, CUTOUT_SIZE
from sdsscl.data import SurveyDataset
from sdsscl.maps import (
    STATIONARITY_KINDS,
    augmented_copies,
    fit_umap,
    interactive_map,
    label_type,
    mosaic,
    pixel_vectors,
    plot_colored,
    plot_mosaic,
    plot_stationarity,
    stationarity,
    thumbnails_base64,
)

pytest.importorskip("umap")

MAD = (0.041, 0.0165, 0.0275, 0.044, 0.19)   # SDSS-like per-band sky MAD, nanomaggies


def two_clusters(n: int = 150, d: int = 10, gap: float = 8.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two unit Gaussian clusters ``gap`` apart along the first axis; (2n, d) rows and labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, d)).astype(np.float32)
    x[n:, 0] += gap
    return x, np.repeat([0, 1], n)


def galaxies(g: int = 3, size: int = CUTOUT_SIZE, seed: int = 0) -> torch.Tensor:
    """Off-centre elongated blobs plus sky noise, (g, 5, size, size) nanomaggies."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    out = []
    for _ in range(g):
        cy, cx = (size // 2 + 6 * (torch.rand(2, generator=gen) - 0.5)).tolist()
        blob = 10 * torch.exp(-(((xx - cx) / 6) ** 2 + ((yy - cy) / 3) ** 2))
        colour = torch.tensor([0.3, 0.6, 1.0, 1.2, 1.4])[:, None, None]
        out.append(colour * blob + 0.03 * torch.randn(5, size, size, generator=gen))
    return torch.stack(out)


@pytest.fixture(scope="module")
def cluster_map():
    x, label = two_clusters()
    return x, label, fit_umap(x, fit_fraction=0.5, min_fit=50, n_neighbors=10, min_dist=0.1, seed=1,
                              metric="euclidean")


# ----------------------------------------------------------------------------- UMAP
def test_umap_keeps_separated_clusters_apart(cluster_map):
    x, label, m = cluster_map
    assert m.embedding.shape == (x.shape[0], 2) and m.embedding.dtype == np.float32
    e = m.embedding.astype(np.float64)
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :10]                                   # 10 nearest in 2-D
    assert (label[nearest] == label[:, None]).all()
    # and the clusters' bounding boxes do not overlap along at least one axis
    lo0, hi0, lo1, hi1 = e[label == 0].min(0), e[label == 0].max(0), e[label == 1].min(0), e[label == 1].max(0)
    assert ((hi0 < lo1) | (hi1 < lo0)).any()


def test_umap_subsample_size_and_reproducibility(cluster_map):
    x, _, m = cluster_map
    assert m.fit_indices.size == 150 and np.unique(m.fit_indices).size == 150
    assert (np.diff(m.fit_indices) > 0).all() and m.reducer.embedding_.shape == (150, 2)
    again = fit_umap(x, fit_fraction=0.5, min_fit=50, n_neighbors=10, min_dist=0.1, seed=1, metric="euclidean")
    np.testing.assert_array_equal(again.fit_indices, m.fit_indices)
    np.testing.assert_array_equal(again.embedding, m.embedding)
    other = fit_umap(x, fit_fraction=0.5, min_fit=50, n_neighbors=10, min_dist=0.1, seed=2, metric="euclidean")
    assert not np.array_equal(other.fit_indices, m.fit_indices)
    # min_fit wins over a small fraction; never more than all rows
    small = fit_umap(x[:100], fit_fraction=0.01, min_fit=60, n_neighbors=10, min_dist=0.1, seed=0, metric="cosine")
    assert small.fit_indices.size == 60 and small.metric == "cosine"
    every = fit_umap(x[:40], fit_fraction=0.5, min_fit=1000, n_neighbors=10, min_dist=0.1, seed=0)
    np.testing.assert_array_equal(every.fit_indices, np.arange(40))
    with pytest.raises(ValueError, match="metric"):
        fit_umap(x, 0.5, 50, 10, 0.1, metric="manhattan")


def test_transform_of_fitted_rows_lands_near_their_fit_embedding(cluster_map):
    x, _, m = cluster_map
    placed = m.transform(torch.from_numpy(x[m.fit_indices]))                  # torch input works too
    fitted = m.reducer.embedding_
    extent = np.ptp(fitted, axis=0).max()
    assert np.median(np.linalg.norm(placed - fitted, axis=1)) < 0.05 * extent
    # umap-learn's placement depends a little on the batch (edge pruning relative to the
    # batch's strongest edge), so the same rows placed in another batch land nearby
    assert np.median(np.linalg.norm(placed - m.embedding[m.fit_indices], axis=1)) < 0.05 * extent
    np.testing.assert_array_equal(m.transform(x[m.fit_indices]), placed)       # same batch, same seed
    assert m.transform(np.zeros((0, x.shape[1]))).shape == (0, 2)


def test_pixel_vectors_from_tensor_array_and_dataset_like():
    images = galaxies(3)
    v = pixel_vectors(images, batch_size=2)
    assert v.shape == (3, 5 * CROP_SIZE * CROP_SIZE) and v.dtype == np.float32
    np.testing.assert_array_equal(v[1], CenterCrop()(images)[1].reshape(-1).numpy())
    np.testing.assert_array_equal(pixel_vectors(images.numpy()), v)

    class Items:                                   # the SurveyDataset item protocol
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"image": images[i], "index": i, "ObjID": 100 + i}

    np.testing.assert_array_equal(pixel_vectors(Items(), batch_size=2), v)


def survey_file(path, images: torch.Tensor):
    """A minimal file in the authors' layout (the eight keys of sdsscl.constants.AUTHOR_KEYS)."""
    n = images.shape[0]
    with h5py.File(path, "w") as f:
        f["images"] = images.numpy()
        f["ObjID"] = np.arange(1000, 1000 + n, dtype=np.int64)
        f["specObjID"] = np.full(n, -1, dtype=np.int64)
        for key in ("ra", "dec", "specz_redshift", "specz_redshift_err"):
            f[key] = np.zeros(n)
        f["e_bv"] = np.zeros((n, 5))
    return path


def test_survey_dataset_inputs(tmp_path):
    images = galaxies(4)
    ds = SurveyDataset(survey_file(tmp_path / "tiny.h5", images))
    np.testing.assert_array_equal(pixel_vectors(ds.subset([3, 1]), batch_size=1), pixel_vectors(images[[3, 1]]))
    assert thumbnails_base64(ds) == thumbnails_base64(images)
    page = interactive_map(np.random.default_rng(0).normal(size=(4, 2)), ds, {"ObjID": ds.objids}, max_points=3)
    assert page.count("iVBOR") == 3 and len(re.findall(r'\["10\d\d"\]', page)) == 3     # labels rows


# ----------------------------------------------------------------------------- mosaic
@pytest.mark.parametrize("pick", ["random", "nearest"])
def test_mosaic_one_galaxy_per_cell_inside_its_cell(pick):
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.normal(size=(300, 2)), rng.normal(size=(100, 2)) * [3.0, 0.5] + [6, 0]])
    xy[5] = np.nan                                                                # never chosen
    m = mosaic(xy, n_cells=8, seed=3, pick=pick)
    assert m.chosen.shape == (8, 8) and m.x_edges.shape == m.y_edges.shape == (9,)
    np.testing.assert_allclose(np.diff(m.x_edges), np.diff(m.y_edges))            # square cells
    idx = m.indices
    assert np.unique(idx).size == idx.size and 5 not in idx
    for (iy, ix), i in zip(m.cells, idx):
        assert m.x_edges[ix] <= xy[i, 0] <= m.x_edges[ix + 1]
        assert m.y_edges[iy] <= xy[i, 1] <= m.y_edges[iy + 1]
    # every occupied cell gets a galaxy
    finite = np.isfinite(xy).all(1)
    ix = np.clip(np.searchsorted(m.x_edges, xy[finite, 0], side="right") - 1, 0, 7)
    iy = np.clip(np.searchsorted(m.y_edges, xy[finite, 1], side="right") - 1, 0, 7)
    assert len(set(zip(iy.tolist(), ix.tolist()))) == idx.size
    np.testing.assert_array_equal(mosaic(xy, 8, seed=3, pick=pick).chosen, m.chosen)


def test_mosaic_random_pick_varies_with_seed_and_plot_mosaic_draws():
    xy = np.random.default_rng(1).normal(size=(500, 2))
    a, b = mosaic(xy, 4, seed=0), mosaic(xy, 4, seed=1)
    assert not np.array_equal(a.chosen, b.chosen)
    images = galaxies(a.indices.size)
    fig = plot_mosaic(a, images, pixels_per_cell=16)
    assert isinstance(fig, Figure)
    canvas = fig.axes[0].images[0].get_array()
    assert canvas.shape == (64, 64, 4)
    assert (canvas[..., 3] == 255).sum() == a.indices.size * 16 * 16              # empty cells clear
    with pytest.raises(ValueError, match="images"):
        plot_mosaic(a, images[:1])


def test_plot_colored_numeric_nan_and_categories():
    xy = np.random.default_rng(2).normal(size=(50, 2))
    z = np.linspace(0, 0.3, 50)
    z[::3] = np.nan
    kinds = label_type(np.isfinite(z), np.arange(50) % 2 == 0)
    assert set(kinds) == {"spec-z + GZ2", "spec-z", "GZ2", "none"}
    fig = plot_colored(xy, {"redshift": z, "label type": kinds, "r": np.arange(50.0)}, ncols=2)
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["redshift", "label type", "r"]
    grey, coloured = panels[0].collections[:2]
    assert len(grey.get_offsets()) == 17 and len(coloured.get_offsets()) == 33   # NaN underneath
    assert len(panels[1].get_legend().get_texts()) == 4
    with pytest.raises(ValueError, match="shape"):
        plot_colored(xy, {"bad": np.zeros(3)})


# ----------------------------------------------------------------------------- augmented copies
def test_rotation_copies_match_rot90_and_include_the_original():
    images = galaxies(2)
    copies, angles = augmented_copies(images, "rotation")
    assert copies.shape == (2, 8, 5, CROP_SIZE, CROP_SIZE)
    np.testing.assert_array_equal(angles, np.arange(0, 360, 45))
    crop = CenterCrop()
    torch.testing.assert_close(copies[:, 0], crop(images), rtol=0, atol=0)
    # 90 degrees counter-clockwise as displayed is torch.rot90(k=1) about the cutout centre
    torch.testing.assert_close(copies[:, 2], crop(torch.rot90(images, 1, dims=(-2, -1))), rtol=0, atol=1e-6)
    # ... and, away from the crop's edges, the rotated crop itself (crop centre 52.5, not 53:
    # one pixel apart along one axis)
    turned = torch.rot90(crop(images), 1, dims=(-2, -1))
    torch.testing.assert_close(copies[:, 2, :, 4:-4, 4:-4], turned[:, :, 3:-5, 4:-4], rtol=0, atol=1e-6)


def test_jitter_copies_are_diagonal_integer_crops():
    images = galaxies(2)
    copies, offsets = augmented_copies(images, "jitter")
    assert copies.shape == (2, 7, 5, CROP_SIZE, CROP_SIZE)
    np.testing.assert_array_equal(offsets, [-7, -5, -2, 0, 2, 5, 7])
    torch.testing.assert_close(copies[:, 3], CenterCrop()(images), rtol=0, atol=0)
    top = CUTOUT_SIZE // 2 - CROP_SIZE // 2 - 7                                     # offset -7
    torch.testing.assert_close(copies[:, 0], images[:, :, top:top + CROP_SIZE, top:top + CROP_SIZE],
                               rtol=0, atol=0)


def test_noise_copies_have_the_requested_level():
    images = galaxies(2)
    copies, levels = augmented_copies(images, "noise", mad=MAD, seed=4)
    assert copies.shape == (2, 7, 5, CROP_SIZE, CROP_SIZE)
    np.testing.assert_allclose(levels, np.linspace(0, 3, 7))
    clean = CenterCrop()(images)
    torch.testing.assert_close(copies[:, 0], clean, rtol=0, atol=0)
    residual = (copies - clean[:, None]).double()                                 # (G, S, 5, 64, 64)
    measured = residual.std(dim=(0, 3, 4))                                        # (S, 5)
    expected = torch.from_numpy(np.outer(levels, MAD))
    # 2 x 64 x 64 samples per band: relative error of a standard deviation ~ 1 / sqrt(2 n) ~ 0.8%
    torch.testing.assert_close(measured[1:], expected[1:], rtol=0.05, atol=0)
    again, _ = augmented_copies(images, "noise", mad=MAD, seed=4)
    torch.testing.assert_close(again, copies, rtol=0, atol=0)
    with pytest.raises(ValueError, match="MAD"):
        augmented_copies(images, "noise")
    with pytest.raises(ValueError, match="kind"):
        augmented_copies(images, "flip")


def test_custom_steps():
    copies, angles = augmented_copies(galaxies(1), "rotation", steps=4)
    assert copies.shape[1] == 4 and angles.tolist() == [0, 90, 180, 270]


# ----------------------------------------------------------------------------- stationarity
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_stationarity_zero_for_identical_copies_and_grows_with_movement(metric):
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 16))
    originals = reference[:5]
    still = np.repeat(originals[:, None], 6, axis=1)                              # (G, S, D)
    small = still + 0.05 * rng.normal(size=still.shape)
    large = still + 1.0 * rng.normal(size=still.shape)
    out = stationarity({"rotation": still, "jitter": small, "noise": large}, originals, reference, metric=metric)
    assert out["metric"] == metric and out["pair_median"] > 0
    assert out["per_kind"]["rotation"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < out["per_kind"]["jitter"] < out["per_kind"]["noise"]
    assert out["per_galaxy"]["noise"].shape == (5,)
    assert out["mean"] == pytest.approx(np.mean(list(out["per_kind"].values())))
    # copies as far as random other galaxies score about 1
    others = reference[rng.integers(5, 200, size=(5, 6))]
    far = stationarity({"x": others}, originals, reference, metric=metric)["per_kind"]["x"]
    assert far == pytest.approx(1, abs=0.3)
    with pytest.raises(ValueError, match="shape"):
        stationarity({"x": still[:, :, :3]}, originals, reference, metric=metric)


def test_plot_stationarity_grid():
    rng = np.random.default_rng(0)
    emb = {space: {kind: rng.normal(size=(3, 7, 2)) for kind in STATIONARITY_KINDS}
           for space in ("pixels", "representations")}
    bg = {space: rng.normal(size=(100, 2)) for space in emb}
    fig = plot_stationarity(emb, bg)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert [ax.get_title() for ax in fig.axes[:3]] == list(STATIONARITY_KINDS)
    assert fig.axes[3].get_ylabel() == "representations UMAP"
    assert len(fig.axes[0].collections) == 1 + 3                                  # background + galaxies


# ----------------------------------------------------------------------------- interactive map
def test_interactive_map_one_entry_per_point_and_no_urls():
    rng = np.random.default_rng(0)
    n = 12
    xy = rng.normal(size=(n, 2))
    images = galaxies(n)
    labels = {"redshift": np.where(np.arange(n) % 4 == 0, np.nan, 0.1), "type": np.array(["a<b>"] * n)}
    page = interactive_map(xy, images, labels, color_by="redshift")
    assert len(re.findall(r"<circle data-i=", page)) == n
    assert page.count("iVBOR") == n                                            # one PNG per point
    code = page
    for thumb in re.findall(r'"iVBOR[A-Za-z0-9+/=]*"', page):                # base64 may hold "//"
        code = code.replace(thumb, '""')
    assert not re.search(r'https?:|//|(src|href)="(?!data:)|url\(', code)      # nothing to fetch
    assert "a<b>" not in page and "a&lt;b&gt;" in page                          # labels escaped
    assert page == interactive_map(xy, images, labels, color_by="redshift")     # deterministic
    small = interactive_map(xy, thumbnails_base64(images, size=16), labels, max_points=5)
    assert len(re.findall(r"<circle data-i=", small)) == 5 and small.count("iVBOR") == 5
    assert len(re.findall(r"<circle ", interactive_map(xy, None, {}))) == n
    with pytest.raises(KeyError):
        interactive_map(xy, None, labels, color_by="mass")
