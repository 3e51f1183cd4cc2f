"""Two-dimensional maps of the galaxies: UMAP of the representations and of the pixels.

The paper's figures this module makes (Hayat et al. 2021):

* Figure 2 (Section 3.1): the UMAP of the self-supervised representations, as a mosaic of
  galaxy images (:func:`mosaic`, :func:`plot_mosaic`) and coloured by labels
  (:func:`plot_colored`, with :func:`label_type` for the "label type" panel);
* Figure 8 (Appendix B.2): the same for a UMAP of the flattened images (:func:`pixel_vectors`);
* Figure 9: how ten galaxies move through both maps under rotation, jitter and noise
  (:func:`augmented_copies`, :func:`stationarity`, :func:`plot_stationarity`);
* Figure 10: both maps coloured by Petrosian r magnitude and radius (:func:`plot_colored`);
* an interactive version of the map for the HTML book (:func:`interactive_map`), where hovering
  a point shows its galaxy, as the paper suggests for a data portal (Section 3.1).

The recipe of Appendix B.2: UMAP is fitted on a random 5% of the galaxies (:func:`fit_umap`;
at least ``min_fit``), and that fitted transformation places every galaxy, so the fitted and
the other galaxies are placed alike and new points (augmented copies) can be added later.

Figures are ``matplotlib.figure.Figure`` objects built without ``pyplot`` (as in
:mod:`sdsscl.plotting`); images are drawn with ``origin="lower"``, like
:func:`sdsscl.plotting.show_galaxies`. ``umap`` is imported when a map is fitted, so the
module imports quickly and without it.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import Normalize, to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from .augment import (
    CenterCrop,
    GaussianNoise,
    JitterCrop,
    JitterParams,
    NoiseParams,
    RandomRotate,
    RotationParams,
)
from .constants import CROP_SIZE, MAX_JITTER
from .plotting import lupton_rgb

log = logging.getLogger(__name__)

#: UMAP metrics :func:`fit_umap` accepts (see its docstring for which space uses which).
METRICS: tuple[str, ...] = ("cosine", "euclidean")
#: The augmentations of Figure 9, in the paper's order.
STATIONARITY_KINDS: tuple[str, ...] = ("rotation", "jitter", "noise")
#: Colour of points without a value (NaN) in the coloured maps.
MISSING_COLOR = "#d9d9d9"
#: Largest noise level of Figure 9, in units of the per-band MAD (Appendix B.2: 0 to 3).
MAX_NOISE_LEVEL = 3.0


# ----------------------------------------------------------------------------- UMAP
@dataclass
class UmapMap:
    """A UMAP fitted on some rows and applied to all of them (Appendix B.2).

    reducer: the fitted ``umap.UMAP``.
    fit_indices: rows of the input the reducer was fitted on, sorted, shape (n_fit,).
    embedding: 2-D position of every input row, float32 (N, 2), from ``reducer.transform``.
    metric: the input-space metric, "cosine" or "euclidean".
    """

    reducer: Any
    fit_indices: np.ndarray
    embedding: np.ndarray
    metric: str

    def transform(self, vectors) -> np.ndarray:
        """Place new vectors (M, D) in the fitted map: (M, 2) float32 (Figure 9's copies).

        umap-learn's placement depends a little on the batch (it prunes the batch's weakest
        graph edges relative to its strongest), so a vector placed within another batch may
        land nearby (a few percent of the map's extent) rather than on the same spot; the same
        batch always gives the same result.
        """
        v = _as_matrix(vectors)
        if v.shape[0] == 0:
            return np.zeros((0, 2), np.float32)
        return np.asarray(self.reducer.transform(v), dtype=np.float32)               # (M, 2)


def _as_matrix(vectors) -> np.ndarray:
    """A C-contiguous float32 (N, D) array from numpy or torch rows."""
    if isinstance(vectors, Tensor):
        vectors = vectors.detach().cpu().numpy()
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if v.ndim != 2:
        raise ValueError(f"expected vectors of shape (N, D), got {v.shape}")
    return v


def fit_umap(vectors, fit_fraction: float, min_fit: int, n_neighbors: int, min_dist: float,
             seed: int = 0, metric: str = "cosine") -> UmapMap:
    """UMAP to two dimensions, fitted on a random subsample and applied to every row.

    The paper's recipe (Appendix B.2): the transformation is determined on a random 5% of the
    galaxies, then applied to all of them. Here ``n_fit = clip(ceil(fit_fraction * N), min_fit,
    N)`` rows are drawn without replacement by ``numpy.random.default_rng(seed)``, the reducer
    is fitted on them, and ``reducer.transform`` places all N rows (the fitted rows included, so
    every galaxy is placed the same way).

    vectors: (N, D) numpy or torch rows, representations or :func:`pixel_vectors`.
    fit_fraction, min_fit, n_neighbors, min_dist: ``profile.representations.umap_*``
        (``n_neighbors`` is capped at ``n_fit - 1``).
    seed: the subsample and UMAP's ``random_state``: the same seed gives the same map on a
        CPU. (A ``random_state`` makes umap-learn run single-threaded.)
    metric: "cosine" for representations: the contrastive loss scores views by the cosine
        similarity of their (projected, normalised) vectors (Section 2), and the paper searches
        the representations by cosine similarity (Appendix B.1), so direction, not length, is
        what the network was trained to make meaningful. "euclidean" for pixels: the image UMAP
        of Appendix B.2 works on the raw flattened fluxes, and brightness and size, which a
        cosine would partly divide out, are what it sorts the galaxies by (Figure 8).
    Returns a :class:`UmapMap`.

    Cost on 2 CPU cores: the first fit in a process spends ~10-15 s compiling umap-learn's
    numba code; then 2,000 vectors (1,000 fitted) take ~7 s (128-d) to ~25 s (20,480 pixels).
    """
    import umap  # ~2 s to import (numba); only when a map is fitted

    if metric not in METRICS:
        raise ValueError(f"fit_umap: metric must be one of {METRICS}, got {metric!r}")
    if not 0 < fit_fraction <= 1:
        raise ValueError(f"fit_umap: fit_fraction must lie in (0, 1], got {fit_fraction}")
    v = _as_matrix(vectors)                                                          # (N, D)
    n = v.shape[0]
    n_fit = min(n, max(int(min_fit), math.ceil(fit_fraction * n)))
    if n_fit < 3:
        raise ValueError(f"fit_umap: need at least 3 rows to fit a UMAP, got {n_fit} of {n}")
    fit = np.sort(np.random.default_rng(seed).choice(n, size=n_fit, replace=False))
    reducer = umap.UMAP(n_components=2, n_neighbors=min(int(n_neighbors), n_fit - 1),
                        min_dist=float(min_dist), metric=metric, random_state=seed,
                        transform_seed=seed, n_jobs=1)
    log.info("fitting a %s UMAP on %d of %d rows (%d dimensions)", metric, n_fit, n, v.shape[1])
    reducer.fit(v[fit])
    embedding = np.asarray(reducer.transform(v), dtype=np.float32)                  # (N, 2)
    return UmapMap(reducer=reducer, fit_indices=fit, embedding=embedding, metric=metric)


def _center_crops(images, crop_size: int, batch_size: int):
    """Centre crops (b, 5, S, S) float32 of a tensor, array or SurveyDataset, a batch at a time."""
    crop = CenterCrop(crop_size=crop_size)
    if isinstance(images, (Tensor, np.ndarray)):
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, 5, H, W), got {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield crop(images[start:start + batch_size].float())
        return
    for start in range(0, len(images), batch_size):                                # a dataset
        items = [images[i]["image"] for i in range(start, min(start + batch_size, len(images)))]
        yield crop(torch.stack(items))


def pixel_vectors(images, crop_size: int = CROP_SIZE, batch_size: int = 256) -> np.ndarray:
    """The flattened centre crops, the input of the image UMAP (Appendix B.2, Figure 8).

    images: (B, 5, H, W) tensor or array in nanomaggies, or a :class:`sdsscl.data.SurveyDataset`
    (read ``batch_size`` galaxies at a time). Each image is centre-cropped to the
    ``crop_size`` x ``crop_size`` the network sees and flattened, band-major: (B, 5 * S * S)
    float32. Fluxes are left as they are: the paper flattens the images as they are.
    """
    parts = [c.reshape(c.shape[0], -1).numpy() for c in _center_crops(images, crop_size, batch_size)]
    if not parts:
        return np.zeros((0, 5 * crop_size * crop_size), np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)                     # (B, 5*S*S)


# ----------------------------------------------------------------------------- mosaic (Fig. 2, 8 left)
@dataclass
class Mosaic:
    """One galaxy per occupied cell of a square grid over a 2-D map (Figure 2 left).

    x_edges, y_edges: cell edges, (n_cells + 1,) each; the cells are square.
    chosen: (n_cells, n_cells) row index of the galaxy shown in cell ``[iy, ix]`` (y first,
        as in an image), -1 for an empty cell.
    """

    x_edges: np.ndarray
    y_edges: np.ndarray
    chosen: np.ndarray

    @property
    def indices(self) -> np.ndarray:
        """Chosen rows, cell by cell in row-major ``[iy, ix]`` order (the order of ``cells``)."""
        return self.chosen[self.chosen >= 0]

    @property
    def cells(self) -> np.ndarray:
        """``(iy, ix)`` of the occupied cells, (K, 2), in the order of ``indices``."""
        return np.argwhere(self.chosen >= 0)


def _cell_of(embedding: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(iy, ix) cell of each point; points on the upper edge go to the last cell."""
    n = x_edges.size - 1
    ix = np.clip(np.searchsorted(x_edges, embedding[:, 0], side="right") - 1, 0, n - 1)
    iy = np.clip(np.searchsorted(y_edges, embedding[:, 1], side="right") - 1, 0, n - 1)
    return iy, ix


def mosaic(embedding, n_cells: int, seed: int = 0, pick: str = "random") -> Mosaic:
    """Bin a 2-D map into ``n_cells`` x ``n_cells`` square cells and choose one galaxy per cell.

    The grid is a square covering the points' range (the longer axis sets the side, the shorter
    is centred), so cells are square and images are not stretched. pick: "random" (the paper's
    Figure 2: "randomly selecting a sample that resides within each cell", a seeded uniform
    choice among the cell's galaxies) or "nearest" (the galaxy nearest the cell centre: a
    tidier grid). Non-finite points are never chosen.
    """
    xy = np.asarray(embedding, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"mosaic: expected an embedding of shape (N, 2), got {xy.shape}")
    if n_cells < 1:
        raise ValueError(f"mosaic: n_cells must be at least 1, got {n_cells}")
    if pick not in ("random", "nearest"):
        raise ValueError(f"mosaic: pick must be 'random' or 'nearest', got {pick!r}")
    ok = np.flatnonzero(np.isfinite(xy).all(axis=1))
    chosen = np.full((n_cells, n_cells), -1, dtype=np.int64)
    if ok.size == 0:
        return Mosaic(np.linspace(0, 1, n_cells + 1), np.linspace(0, 1, n_cells + 1), chosen)
    lo, hi = xy[ok].min(axis=0), xy[ok].max(axis=0)
    side = max(float((hi - lo).max()), 1e-12) * (1 + 1e-6)      # a hair wider: no point on an edge
    start = (lo + hi) / 2 - side / 2                                                # (2,)
    x_edges = start[0] + side * np.linspace(0, 1, n_cells + 1)
    y_edges = start[1] + side * np.linspace(0, 1, n_cells + 1)
    iy, ix = _cell_of(xy[ok], x_edges, y_edges)
    cell = iy * n_cells + ix                                                        # (n_ok,)
    if pick == "random":
        order = np.random.default_rng(seed).permutation(ok.size)
    else:
        centre_x = (x_edges[ix] + x_edges[ix + 1]) / 2
        centre_y = (y_edges[iy] + y_edges[iy + 1]) / 2
        dist = np.hypot(xy[ok, 0] - centre_x, xy[ok, 1] - centre_y)
        order = np.argsort(dist, kind="stable")
    cells, first = np.unique(cell[order], return_index=True)        # first galaxy of each cell
    chosen.reshape(-1)[cells] = ok[order[first]]
    return Mosaic(x_edges=x_edges, y_edges=y_edges, chosen=chosen)


def _resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """(K, H, W, C) -> (K, size, size, C) by block average (integer factor) or nearest pixel."""
    h, w = rgb.shape[1:3]
    if (h, w) == (size, size):
        return rgb
    if h == w and h % size == 0:
        f = h // size
        blocks = rgb.reshape(rgb.shape[0], size, f, size, f, -1).astype(np.float32)
        return blocks.mean(axis=(2, 4)).round().astype(rgb.dtype)
    rows = ((np.arange(size) + 0.5) * h / size).astype(int)
    cols = ((np.arange(size) + 0.5) * w / size).astype(int)
    return rgb[:, rows][:, :, cols]


def _thumbnail_rgb(images, size: int, crop_size: int) -> np.ndarray:
    """Lupton RGB (K, size, size, 3) uint8 of the centre crops of K images (tensor, array or
    SurveyDataset, as :func:`pixel_vectors` takes them)."""
    rgb = [lupton_rgb(crops) for crops in _center_crops(images, crop_size, 256)]
    if not rgb:
        return np.zeros((0, size, size, 3), np.uint8)
    return _resize(np.concatenate(rgb), size)                                       # (K, s, s, 3)


def plot_mosaic(m: Mosaic, images, *, crop_size: int = CROP_SIZE, pixels_per_cell: int | None = None,
                size: float = 7.0, ax=None) -> Figure:
    """Draw each chosen galaxy's Lupton RGB in its cell (Figure 2 left, Figure 8 left).

    m: from :func:`mosaic`. images: (K, 5, H, W) of the galaxies ``m.indices``, in that order
    (a tensor, an array or ``dataset.subset(m.indices)``). They are centre-cropped to ``crop_size``
    (what the network sees) and resampled to ``pixels_per_cell`` (default: 64 for up to 32
    cells per side, then smaller, so the canvas stays near 2048 pixels). The mosaic is one
    image, empty cells transparent. ax: draw into this axis; otherwise a new figure.
    Returns the Figure.
    """
    k = m.indices.size
    if len(images) != k:
        raise ValueError(f"plot_mosaic: {len(images)} images for {k} occupied cells")
    n = m.chosen.shape[0]
    px = pixels_per_cell or int(np.clip(2048 // n, 8, 64))
    canvas = np.zeros((n * px, n * px, 4), dtype=np.uint8)                         # RGBA
    if k:
        rgb = _thumbnail_rgb(images, px, crop_size)                                 # (K, px, px, 3)
        for (iy, ix), thumb in zip(m.cells, rgb):
            canvas[iy * px:(iy + 1) * px, ix * px:(ix + 1) * px, :3] = thumb
            canvas[iy * px:(iy + 1) * px, ix * px:(ix + 1) * px, 3] = 255
    if ax is None:
        fig = Figure(figsize=(size, size), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure
    ax.imshow(canvas, origin="lower", interpolation="nearest",
              extent=(m.x_edges[0], m.x_edges[-1], m.y_edges[0], m.y_edges[-1]))
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


# ----------------------------------------------------------------------------- coloured maps (Fig. 2, 8, 10)
def label_type(has_specz, has_gz2) -> np.ndarray:
    """The "label type" of Figure 2: "spec-z + GZ2", "spec-z", "GZ2" or "none", per galaxy."""
    z, m = np.asarray(has_specz, bool), np.asarray(has_gz2, bool)
    return np.where(z & m, "spec-z + GZ2", np.where(z, "spec-z", np.where(m, "GZ2", "none")))


def _is_categorical(values: np.ndarray) -> bool:
    return values.dtype.kind in "OUSb"


def plot_colored(embedding, panels: Mapping[str, Any], *, ncols: int = 3, point_size: float = 2.0,
                 cmap: str = "viridis", limits: Mapping[str, tuple[float, float]] | None = None,
                 percentiles: tuple[float, float] = (1.0, 99.0), panel_size: float = 3.2,
                 seed: int = 0) -> Figure:
    """The map as scatter panels, one per label, coloured by its value (Figure 2 right, 8, 10).

    embedding: (N, 2). panels: ``{title: values (N,)}``, e.g. a GZ2 vote fraction, the
    spectroscopic redshift, :func:`label_type`, Petrosian r magnitude or radius. Numeric values
    get a colour bar from the ``percentiles`` of the finite values (or ``limits[title]``);
    non-finite values (no label) are drawn light grey underneath. String or boolean values are
    categories, each with its own colour and a legend. Points are drawn in a seeded random
    order, so no class hides another by coming last. Returns the Figure.
    """
    xy = np.asarray(embedding, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"plot_colored: expected an embedding of shape (N, 2), got {xy.shape}")
    limits = dict(limits or {})
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows), layout="constrained")
    order = np.random.default_rng(seed).permutation(xy.shape[0])
    for k, (title, raw) in enumerate(panels.items()):
        values = np.asarray(raw)
        if values.shape != (xy.shape[0],):
            raise ValueError(f"plot_colored: panel {title!r} has shape {values.shape}, "
                             f"expected ({xy.shape[0]},)")
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.set_title(str(title), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal", adjustable="datalim")
        if _is_categorical(values):
            names = sorted(set(values.tolist()), key=str)
            palette = colormaps["tab10"]
            colour_of = {name: palette(i % 10) for i, name in enumerate(names)}
            ax.scatter(xy[order, 0], xy[order, 1], s=point_size, linewidths=0,
                       c=[colour_of[v] for v in values[order].tolist()])
            ax.legend(handles=[Line2D([], [], ls="", marker="o", color=colour_of[n], label=str(n))
                               for n in names], fontsize=7, markerscale=0.8, loc="best")
            continue
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        missing = order[~finite[order]]
        ax.scatter(xy[missing, 0], xy[missing, 1], s=point_size, linewidths=0, c=MISSING_COLOR)
        shown = order[finite[order]]
        if shown.size == 0:
            continue
        lo, hi = limits.get(title, np.percentile(values[shown], percentiles))
        points = ax.scatter(xy[shown, 0], xy[shown, 1], s=point_size, linewidths=0, c=values[shown],
                            cmap=cmap, vmin=lo, vmax=hi if hi > lo else lo + 1e-12)
        fig.colorbar(points, ax=ax, shrink=0.8)
    return fig


# ----------------------------------------------------------------------------- stationarity (Fig. 9)
def augmented_copies(images, kind: str, mad: Sequence[float] | None = None, steps: int | None = None,
                     seed: int = 0, crop_size: int = CROP_SIZE,
                     max_jitter: int = MAX_JITTER) -> tuple[Tensor, np.ndarray]:
    """Each galaxy under a sweep of one augmentation, as the network sees it (Figure 9).

    images: (G, 5, H, W) cutouts (107 x 107), nanomaggies. kind and its sweep (Appendix B.2):

    * "rotation": angles ``0, 45, ..., 315`` degrees (``steps`` = 8 values, ``360 / steps``
      apart), counter-clockwise as displayed, about the cutout centre
      (:class:`sdsscl.augment.RandomRotate` with fixed angles), then the centre crop;
    * "jitter": crop centres moved diagonally by ``(d, d)`` for ``d`` in ``steps`` = 7 values
      from ``-max_jitter`` to ``+max_jitter``, linearly spaced and rounded to whole pixels
      (-7, -5, -2, 0, 2, 5, 7) as the training jitter is (:class:`sdsscl.augment.JitterCrop`);
    * "noise": Gaussian noise of standard deviation ``a * MAD_band`` for ``a`` in ``steps`` = 7
      values from 0 to 3, added to the centre crop (:class:`sdsscl.augment.GaussianNoise` with
      fixed levels; ``mad``, the per-band MAD, is required; the field is drawn from ``seed``).

    Every sweep contains the un-augmented centre crop (angle 0, offset 0, level 0) exactly.
    Returns ``(copies (G, S, 5, crop_size, crop_size) float32, values (S,))``: the degrees,
    the pixel offset along each axis, or the noise level in units of the MAD.
    """
    if kind not in STATIONARITY_KINDS:
        raise ValueError(f"augmented_copies: kind must be one of {STATIONARITY_KINDS}, got {kind!r}")
    x = torch.as_tensor(images).float()
    if x.ndim != 4:
        raise ValueError(f"augmented_copies: expected images (G, 5, H, W), got {tuple(x.shape)}")
    g = x.shape[0]
    crop = CenterCrop(crop_size=crop_size)
    if kind == "rotation":
        s = steps or 8
        values = np.arange(s) * (360.0 / s)                                          # degrees
        batch = x.repeat_interleave(s, dim=0)                                        # (G*S, 5, H, W)
        angle = torch.from_numpy(np.deg2rad(np.tile(values, g))).float()             # (G*S,)
        out = crop(RandomRotate().apply(batch, RotationParams(angle=angle)))
    elif kind == "jitter":
        s = steps or 7
        values = np.rint(np.linspace(-max_jitter, max_jitter, s)).astype(np.int64)   # pixels
        batch = x.repeat_interleave(s, dim=0)
        shifts = torch.from_numpy(np.repeat(np.tile(values, g)[:, None], 2, axis=1))  # (G*S, 2)
        out = JitterCrop(crop_size=crop_size, max_jitter=max_jitter).apply(batch, JitterParams(shifts=shifts))
    else:
        if mad is None:
            raise ValueError("augmented_copies: the 'noise' sweep needs the per-band MAD (mad=...)")
        s = steps or 7
        values = np.linspace(0.0, MAX_NOISE_LEVEL, s)                                 # x MAD
        batch = crop(x).repeat_interleave(s, dim=0)                                  # (G*S, 5, C, C)
        level = torch.from_numpy(np.tile(values, g)).float()
        noise = GaussianNoise(mad, min_level=0.0, max_level=MAX_NOISE_LEVEL)
        out = noise.apply(batch, NoiseParams(level=level, seed=int(seed)))
    return out.reshape(g, s, *out.shape[1:]), values                                 # (G, S, 5, C, C)


def _distance(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise distance between (..., D) arrays: 1 - cosine similarity, or euclidean."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if metric == "euclidean":
        return np.linalg.norm(a - b, axis=-1)
    if metric == "cosine":
        na = np.linalg.norm(a, axis=-1)
        nb = np.linalg.norm(b, axis=-1)
        return 1.0 - (a * b).sum(axis=-1) / np.maximum(na * nb, np.finfo(np.float64).tiny)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def stationarity(copies: Mapping[str, Any], originals, reference, metric: str = "cosine",
                 n_pairs: int = 10000, seed: int = 0) -> dict[str, Any]:
    """How far augmented copies move, in units of the typical distance between galaxies (Fig. 9).

    copies: ``{kind: (G, S, D)}`` vectors of :func:`augmented_copies` (any kinds). originals:
    (G, D) vectors of the same galaxies' un-augmented centre crops. reference: (N, D) vectors
    of many galaxies in the same space, N >= 2.

    For galaxy g and kind k the score is ``mean_s d(copy_gs, original_g) / median d(pair)``,
    where the median is over ``n_pairs`` random pairs of distinct reference galaxies (seeded).
    The un-augmented copy in each sweep counts with distance 0, alike in every space. 0 means
    the copies do not move; about 1 means they move as far as a random other galaxy is. Lower
    is more stationary.

    metric: "cosine" (1 - cosine similarity) for representations: the contrastive loss scores
    pairs of views by a cosine similarity (of the projected vectors) and the paper's similarity
    search uses it on the representations (Appendix B.1), so it is the distance under which
    the network was trained to be invariant.
    "euclidean" for pixels, the metric of the image UMAP: cosine would ignore a change of
    overall brightness, which is a real change of the image. Dividing by the median pair
    distance in the same space makes the two numbers comparable without standardising either
    space. The same function on 2-D UMAP coordinates (euclidean; originals: the galaxies' rows
    of ``UmapMap.embedding``, reference: the whole embedding) scores the maps themselves; there
    an unchanged copy may move a little, since :meth:`UmapMap.transform` depends slightly on
    the batch (on the default run it landed exactly on its map position).

    Returns ``{"per_kind": {kind: mean over galaxies}, "per_galaxy": {kind: (G,)},
    "mean": mean over kinds, "pair_median": the median pair distance, "metric": metric}``.
    """
    ref = reference.detach().cpu().numpy() if isinstance(reference, Tensor) else np.asarray(reference)
    orig = np.asarray(originals, np.float64)
    if ref.ndim != 2 or ref.shape[0] < 2:
        raise ValueError(f"stationarity: reference must be (N >= 2, D), got {ref.shape}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, ref.shape[0], n_pairs)
    j = (i + rng.integers(1, ref.shape[0], n_pairs)) % ref.shape[0]                  # j != i
    chunk = max(1, 2**22 // ref.shape[1])             # ~32 MB of float64 rows at a time (pixels)
    pair_median = float(np.median(np.concatenate(
        [_distance(ref[i[a:a + chunk]], ref[j[a:a + chunk]], metric) for a in range(0, n_pairs, chunk)])))
    if not pair_median > 0:
        raise ValueError("stationarity: the reference galaxies are all at distance 0 from each other")
    per_galaxy: dict[str, np.ndarray] = {}
    for kind, vectors in copies.items():
        v = np.asarray(vectors, np.float64)                                            # (G, S, D)
        if v.ndim != 3 or v.shape[0] != orig.shape[0] or v.shape[2] != orig.shape[1]:
            raise ValueError(f"stationarity: copies[{kind!r}] has shape {v.shape}; expected "
                             f"({orig.shape[0]}, S, {orig.shape[1]}) to match the originals")
        per_galaxy[kind] = _distance(v, orig[:, None, :], metric).mean(axis=1) / pair_median  # (G,)
    per_kind = {kind: float(d.mean()) for kind, d in per_galaxy.items()}
    return {"per_kind": per_kind, "per_galaxy": per_galaxy,
            "mean": float(np.mean(list(per_kind.values()))) if per_kind else float("nan"),
            "pair_median": pair_median, "metric": metric}


#: Markers cycled over the galaxies of Figure 9 (with the colours, they tell galaxies apart).
_MARKERS = ("o", "s", "^", "D", "P", "X", "v", "*", "<", ">")


def plot_stationarity(embeddings: Mapping[str, Mapping[str, Any]], backgrounds: Mapping[str, Any],
                      colors: Sequence | None = None, *, panel_size: float = 3.0,
                      point_size: float = 1.0, marker_size: float = 30.0) -> Figure:
    """Each galaxy's augmented copies placed in each map (Figure 9).

    embeddings: ``{space: {kind: (G, S, 2)}}``, e.g. ``{"pixels": {...}, "representations":
    {...}}`` with the kinds of :data:`STATIONARITY_KINDS`: one row per space, one column per
    kind. backgrounds: ``{space: (N, 2)}``, every galaxy of that map, drawn grey underneath.
    colors: one per galaxy (default: tab10); markers cycle too, so galaxies stay apart in
    grey-scale. Returns the Figure.
    """
    spaces = list(embeddings)
    kinds = list(dict.fromkeys(k for space in spaces for k in embeddings[space]))
    fig = Figure(figsize=(panel_size * len(kinds), panel_size * len(spaces)), layout="constrained")
    for r, space in enumerate(spaces):
        bg = np.asarray(backgrounds[space], np.float64)
        for c, kind in enumerate(kinds):
            ax = fig.add_subplot(len(spaces), len(kinds), r * len(kinds) + c + 1)
            ax.scatter(bg[:, 0], bg[:, 1], s=point_size, c=MISSING_COLOR, linewidths=0)
            if kind in embeddings[space]:
                xy = np.asarray(embeddings[space][kind], np.float64)                   # (G, S, 2)
                palette = colors if colors is not None else [colormaps["tab10"](i % 10)
                                                             for i in range(xy.shape[0])]
                for g, copies in enumerate(xy):
                    ax.scatter(copies[:, 0], copies[:, 1], s=marker_size, color=palette[g],
                               marker=_MARKERS[g % len(_MARKERS)], edgecolors="black", linewidths=0.4)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(kind, fontsize=10)
            if c == 0:
                ax.set_ylabel(f"{space} UMAP", fontsize=10)
    return fig


# ----------------------------------------------------------------------------- interactive map
def thumbnails_base64(images, size: int = 32, crop_size: int = CROP_SIZE, palette: int | None = 64) -> list[str]:
    """Small Lupton RGB PNGs of K images (centre crop, resized), base64 strings.

    images: (K, 5, H, W) tensor or array, or a SurveyDataset (read in batches).

    palette: colours of a palette PNG (median cut), or None for full RGB. At 32 x 32 a
    64-colour thumbnail takes ~1.4 kB of base64 against ~2.7 kB in full colour (mock galaxies),
    and looks the same at hover size.
    """
    from PIL import Image  # a matplotlib dependency

    out = []
    for rgb in _thumbnail_rgb(images, size, crop_size):
        buf = io.BytesIO()
        picture = Image.fromarray(rgb)
        if palette is not None:
            picture = picture.quantize(colors=palette)
        picture.save(buf, format="PNG", optimize=True)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def _label_text(value) -> str:
    """A label as shown in the hover box: 4 significant digits, a dash for NaN."""
    if isinstance(value, (float, np.floating)):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _point_colors(values, n: int) -> tuple[list[str], str]:
    """Hex colour per point and a one-line key: viridis over the 1-99 percentiles (NaN grey),
    or tab10 for categories."""
    if values is None:
        return ["#3b6ea5"] * n, ""
    values = np.asarray(values)
    if _is_categorical(values):
        names = sorted(set(values.tolist()), key=str)
        lookup = {name: to_hex(colormaps["tab10"](i % 10)) for i, name in enumerate(names)}
        key = " ".join(f'<span style="color:{c}">&#9679;</span>&nbsp;{html.escape(str(name))}'
                       for name, c in lookup.items())
        return [lookup[v] for v in values.tolist()], key
    v = values.astype(np.float64)
    finite = np.isfinite(v)
    lo, hi = np.percentile(v[finite], (1, 99)) if finite.any() else (0.0, 1.0)
    rgba = colormaps["viridis"](Normalize(lo, hi if hi > lo else lo + 1e-12, clip=True)(np.where(finite, v, lo)))
    key = f"dark purple {lo:.3g} to yellow {hi:.3g}; grey: no value"
    return [to_hex(c) if ok else MISSING_COLOR for c, ok in zip(rgba, finite)], key


_HOVER_SCRIPT = """(function () {
  var root = document.getElementById("%(id)s");
  var data = JSON.parse(document.getElementById("%(id)s-data").textContent);
  var tip = root.querySelector(".sdsscl-tip");
  root.addEventListener("mouseover", function (ev) {
    var i = ev.target.getAttribute && ev.target.getAttribute("data-i");
    if (i === null || i === undefined) { return; }
    var rows = data.keys.map(function (k, j) {
      return "<tr><td>" + k + "</td><td>" + data.labels[i][j] + "</td></tr>";
    }).join("");
    var img = data.thumbs.length ? '<img width="64" height="64" style="image-rendering:pixelated" ' +
      'src="data:image/png;base64,' + data.thumbs[i] + '">' : "";
    tip.innerHTML = img + "<table>" + rows + "</table>";
    tip.style.display = "block";
    var box = root.getBoundingClientRect(), x = ev.clientX - box.left, y = ev.clientY - box.top;
    tip.style.left = (x + 12 + tip.offsetWidth < box.width ? x + 12 : Math.max(0, x - 12 - tip.offsetWidth)) + "px";
    tip.style.top = (y + 12) + "px";
  });
  root.addEventListener("mouseout", function (ev) {
    if (ev.target.getAttribute && ev.target.getAttribute("data-i") !== null) { tip.style.display = "none"; }
  });
})();"""


def interactive_map(embedding, pictures, labels: Mapping[str, Any] | None = None, *,
                    color_by: str | None = None, max_points: int = 2000, thumb_size: int = 32,
                    width: int = 560, height: int = 560, point_radius: float = 2.5,
                    seed: int = 0) -> str:
    """A self-contained HTML map where hovering a galaxy shows its image and labels.

    The interactive version of Figure 2 (the paper suggests such a portal, Section 3.1), for the
    HTML book (``IPython.display.HTML(interactive_map(...))``). Plain inline SVG and a few lines
    of JavaScript: no library, no network access, no external URL.

    embedding: (N, 2). pictures: the galaxies' (N, 5, H, W) images (tensor, array or
    :class:`sdsscl.data.SurveyDataset`; centre-cropped and turned into ``thumb_size`` Lupton RGB
    PNGs by :func:`thumbnails_base64`), or N base64 PNG strings, or None (no thumbnails).
    labels: ``{name: (N,) values}`` shown on hover. color_by: the label that colours the points
    (numeric: viridis, NaN grey; strings: categories). max_points: when N is larger, a seeded
    random subset of that many points is shown (about 1.5 kB per point with 32 x 32 thumbnails:
    ~3 MB for 2,000 points).
    Returns the HTML snippet; its element id is derived from the data, so the same input gives
    the same text.
    """
    xy = np.asarray(embedding, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"interactive_map: expected an embedding of shape (N, 2), got {xy.shape}")
    labels = dict(labels or {})
    if color_by is not None and color_by not in labels:
        raise KeyError(f"interactive_map: color_by={color_by!r} is not one of the labels {list(labels)}")
    n = xy.shape[0]
    for name, values in labels.items():
        if len(values) != n:
            raise ValueError(f"interactive_map: label {name!r} has {len(values)} values for {n} points")
    keep = np.flatnonzero(np.isfinite(xy).all(axis=1))
    if keep.size > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=max_points, replace=False))
    if pictures is None:
        thumbs: list[str] = []
    elif isinstance(pictures, (list, tuple)) and (not pictures or isinstance(pictures[0], str)):
        if len(pictures) != n:
            raise ValueError(f"interactive_map: {len(pictures)} thumbnails for {n} points")
        thumbs = [pictures[i] for i in keep]
    else:
        if len(pictures) != n:
            raise ValueError(f"interactive_map: {len(pictures)} images for {n} points")
        chosen = pictures.subset(keep) if hasattr(pictures, "subset") else torch.as_tensor(pictures)[keep]
        thumbs = thumbnails_base64(chosen, size=thumb_size)
    pts = xy[keep]
    lo, hi = (pts.min(axis=0), pts.max(axis=0)) if keep.size else (np.zeros(2), np.ones(2))
    pad = 4 * point_radius
    scale = min((width - 2 * pad) / max(hi[0] - lo[0], 1e-12), (height - 2 * pad) / max(hi[1] - lo[1], 1e-12))
    sx = pad + (pts[:, 0] - lo[0]) * scale
    sy = height - pad - (pts[:, 1] - lo[1]) * scale                                # SVG y points down
    colours, key = _point_colors(None if color_by is None else np.asarray(labels[color_by])[keep], keep.size)
    caption = (f"{keep.size} of {n} galaxies; hover for the image and labels"
               + (f". Colour: {html.escape(color_by)} ({key})" if color_by is not None else ""))
    columns = [np.asarray(values)[keep] for values in labels.values()]
    rows = [[_label_text(col[k].item()) for col in columns] for k in range(keep.size)]
    payload = {"keys": [html.escape(str(k)) for k in labels],
               "labels": [[html.escape(v) for v in row] for row in rows], "thumbs": thumbs}
    text = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    uid = "sdsscl-map-" + hashlib.sha1(pts.tobytes() + text.encode()).hexdigest()[:12]
    circles = "".join(f'<circle data-i="{k}" cx="{x:.1f}" cy="{y:.1f}" r="{point_radius}" fill="{c}"/>'
                      for k, (x, y, c) in enumerate(zip(sx, sy, colours)))
    style = ("position:absolute;display:none;pointer-events:none;background:#fff;border:1px solid #888;"
             "padding:4px;font:11px sans-serif;z-index:10")
    log.info("interactive map: %d of %d points, %d thumbnails", keep.size, n, len(thumbs))
    return (f'<div id="{uid}" style="position:relative;width:{width}px">'
            f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'style="background:#fafafa;border:1px solid #ddd">{circles}</svg>'
            f'<div style="font:11px sans-serif;color:#555">{caption}</div>'
            f'<div class="sdsscl-tip" style="{style}"></div>'
            f'<script type="application/json" id="{uid}-data">{text}</script>'
            f'<script>{_HOVER_SCRIPT % {"id": uid}}</script></div>')
