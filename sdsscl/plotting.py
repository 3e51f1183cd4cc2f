"""Figures for sdsscl. For now: galaxy thumbnails as Lupton RGB composites.

The paper shows galaxies "luptonized" (Lupton et al. 2004) from the g, r, i bands
(Section 3.1, footnote 3): i is red, r is green, g is blue. Everything here builds
``matplotlib.figure.Figure`` objects directly (no ``pyplot``, no ``show``), so it works
with any backend, Agg included; save with ``fig.savefig``.

Default stretch, chosen by eye on synthetic PSF-convolved Sersic galaxies (n = 1 and 4,
r = 14-17.5, peak r pixels 2-125 nmgy, SDSS-like sky noise 0.02-0.04 nmgy in g, r, i;
a grid of stretch 0.2-5 and Q 4-12 was compared): the asinh map is linear up to about
``stretch / Q`` and saturates near ``95 * stretch`` (for Q = 8) in the mean g, r, i
intensity. ``stretch=0.5, Q=8`` keeps the sky a dark, faintly grainy background, shows
r ~ 17.5 galaxies clearly and saturates only the cores of the brightest (above ~50 nmgy).
``stretch=0.2`` makes the sky noise prominent; ``stretch >= 2`` loses faint galaxies.
Lower ``stretch`` brightens faint structure; higher ``Q`` compresses bright cores. With
equal band weights (``scales=(1, 1, 1)``, the plain Lupton composite) most galaxies look
yellow-orange because their i flux exceeds their g flux in nanomaggies.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from astropy.visualization import ManualInterval, make_lupton_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .constants import BANDS, N_BANDS

#: Lupton asinh "stretch" (linear scale, nanomaggies) of :func:`lupton_rgb`.
LUPTON_STRETCH = 0.5
#: Lupton asinh softening parameter Q of :func:`lupton_rgb`.
LUPTON_Q = 8.0
#: Channels (in ugriz order) shown as red, green, blue.
RGB_BANDS: tuple[int, int, int] = (BANDS.index("i"), BANDS.index("r"), BANDS.index("g"))


def _to_numpy(images) -> np.ndarray:
    if hasattr(images, "detach"):  # torch tensor, without importing torch here
        images = images.detach().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def lupton_rgb(images, stretch: float = LUPTON_STRETCH, Q: float = LUPTON_Q,
               minimum: float = 0.0, scales: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Lupton et al. (2004) RGB composites from the g, r, i channels (i→R, r→G, g→B).

    images: one ``(5, H, W)`` ugriz image or a batch ``(B, 5, H, W)``, numpy or torch, in
    nanomaggies. stretch: linear range of the asinh map (nanomaggies). Q: asinh
    softening. minimum: flux mapped to black (the sky is background-subtracted, so 0).
    scales: factors applied to the (i, r, g) images before mapping (colour balance).
    Non-finite pixels are shown black. Returns uint8 ``(H, W, 3)`` or ``(B, H, W, 3)``;
    row 0 is the image's first row (draw with ``origin="lower"`` as :func:`show_galaxies`
    does).
    """
    x = _to_numpy(images)
    if x.ndim not in (3, 4) or x.shape[-3] != N_BANDS:
        raise ValueError(f"lupton_rgb needs (5, H, W) or (B, 5, H, W) images, got {x.shape}")
    if stretch <= 0 or Q <= 0:
        raise ValueError(f"stretch and Q must be > 0, got stretch={stretch}, Q={Q}")
    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    batch = x.reshape((-1,) + x.shape[-3:])
    out = np.empty((batch.shape[0],) + x.shape[-2:] + (3,), dtype=np.uint8)
    interval = ManualInterval(vmin=minimum, vmax=None)
    r, g, b = RGB_BANDS
    sr, sg, sb = (float(v) for v in scales)
    for k, img in enumerate(batch):
        with np.errstate(invalid="ignore", divide="ignore"):  # astropy divides by I = 0 in black pixels
            out[k] = make_lupton_rgb(sr * img[r], sg * img[g], sb * img[b], interval=interval,
                                     stretch=stretch, Q=Q)
    return out[0] if x.ndim == 3 else out


def show_galaxies(images, titles: Sequence[str] | None = None, ncols: int = 8,
                  crop_box: int | None = None, panel_size: float = 1.6,
                  stretch: float = LUPTON_STRETCH, Q: float = LUPTON_Q) -> Figure:
    """A grid of Lupton thumbnails, one axis per galaxy.

    images: ``(5, H, W)`` or ``(B, 5, H, W)``, numpy or torch. titles: one per galaxy.
    ncols: panels per row (fewer if there are fewer galaxies). crop_box: side of a centred
    square to outline, e.g. 64 for the crop the network sees (paper Fig. 7); it starts at
    pixel ``H//2 - crop_box//2``, as the centre crop does. Returns the Figure.
    """
    rgb = lupton_rgb(images, stretch=stretch, Q=Q)
    if rgb.ndim == 3:
        rgb = rgb[None]
    n = rgb.shape[0]
    if titles is not None and len(titles) != n:
        raise ValueError(f"{len(titles)} titles for {n} images")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(panel_size * ncols, panel_size * nrows + (0.25 * nrows if titles else 0)),
                 layout="constrained")
    height, width = rgb.shape[1:3]
    for k in range(n):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        ax.imshow(rgb[k], origin="lower", interpolation="nearest")
        if crop_box is not None:
            y0, x0 = height // 2 - crop_box // 2, width // 2 - crop_box // 2
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), crop_box, crop_box, fill=False,
                                   edgecolor="white", linewidth=0.8))
        if titles is not None:
            ax.set_title(str(titles[k]), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def _outline_crop(ax, height: int, width: int, crop_size: int, color: str = "white") -> None:
    """Outline the centred ``crop_size`` square the network sees (as the centre crop takes it)."""
    y0, x0 = height // 2 - crop_size // 2, width // 2 - crop_size // 2
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), crop_size, crop_size, fill=False,
                           edgecolor=color, linewidth=0.8))


def similarity_grid(images_query, images_neighbours, similarities, titles: Sequence[str] | None = None,
                    crop_size: int = 64, colors: Sequence | None = None, panel_size: float = 1.3,
                    stretch: float = LUPTON_STRETCH, Q: float = LUPTON_Q) -> Figure:
    """Paper Figure 7: each row a query galaxy (left, framed in colour) and its k most
    similar galaxies, with the cosine similarity written on each.

    images_query: (Q, 5, H, W). images_neighbours: (Q, k, 5, H, W). similarities: (Q, k).
    titles: one label per query (e.g. its ObjID), shown above it. crop_size: side of the
    centred square outlined on every cutout (the 64x64 the network sees). colors: one frame
    colour per query (default: the tab10 cycle). Whole cutouts are shown, Lupton RGB.
    """
    q_rgb = lupton_rgb(images_query, stretch=stretch, Q=Q)
    n_rgb = lupton_rgb(images_neighbours.reshape((-1,) + tuple(images_neighbours.shape[-3:])),
                       stretch=stretch, Q=Q)
    q_rgb = q_rgb[None] if q_rgb.ndim == 3 else q_rgb
    sims = np.asarray(similarities, dtype=np.float64)
    n_query = q_rgb.shape[0]
    if sims.ndim != 2 or sims.shape[0] != n_query or n_rgb.shape[0] != sims.size:
        raise ValueError(f"similarity_grid: {n_query} queries, {n_rgb.shape[0]} neighbour images and "
                         f"similarities of shape {sims.shape} do not agree (want (Q, k) and Q*k images)")
    if titles is not None and len(titles) != n_query:
        raise ValueError(f"{len(titles)} titles for {n_query} queries")
    k = sims.shape[1]
    n_rgb = n_rgb.reshape((n_query, k) + n_rgb.shape[1:])
    if colors is None:
        from matplotlib import colormaps

        colors = [colormaps["tab10"](i % 10) for i in range(n_query)]
    fig = Figure(figsize=(panel_size * (k + 1.2), panel_size * n_query + (0.2 * n_query if titles else 0)),
                 layout="constrained")
    grid = fig.add_gridspec(n_query, k + 2, width_ratios=[1, 0.2] + [1] * k)
    height, width = q_rgb.shape[1:3]
    for row in range(n_query):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(q_rgb[row], origin="lower", interpolation="nearest")
        _outline_crop(ax, height, width, crop_size)
        for spine in ax.spines.values():
            spine.set_edgecolor(colors[row])
            spine.set_linewidth(3)
        if titles is not None:
            ax.set_title(str(titles[row]), fontsize=7)
        panels = [ax]
        for j in range(k):
            ax = fig.add_subplot(grid[row, j + 2])
            ax.imshow(n_rgb[row, j], origin="lower", interpolation="nearest")
            _outline_crop(ax, height, width, crop_size)
            ax.text(0.04, 0.04, f"{sims[row, j]:.4f}", transform=ax.transAxes, fontsize=7,
                    color="white", ha="left", va="bottom")
            panels.append(ax)
        for ax in panels:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


# ----------------------------------------------------------------------------- downstream figures
MODEL_LABELS = {"supervised": "supervised", "probe": "linear on representations",
                "finetune": "fine-tuned", "photometry": "photometry only (kNN)"}
MODEL_COLORS = {"supervised": "C3", "probe": "C0", "finetune": "C2", "photometry": "0.4"}


def vote_fraction_grid(panels, counts: Sequence[int], models: Sequence[str], question_text: str = "",
                       panel_size: float = 2.3) -> Figure:
    """Predicted against true GZ2 vote fraction (paper Figures 3, 11, 12): one row per label
    count, one column per model; point size and opacity grow with the number of votes; the
    metrics on high-quality labels are inlaid.

    panels: ``{(count, model): {"p_true", "p_pred", "n_votes", "metrics"}}``.
    """
    fig = Figure(figsize=(panel_size * len(models), panel_size * len(counts)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(counts), len(models), sharex=True, sharey=True, squeeze=False))
    for i, count in enumerate(counts):
        for j, model in enumerate(models):
            ax = axes[i, j]
            ax.set_aspect("equal")
            ax.plot([0, 1], [0, 1], color="0.6", lw=0.7)
            panel = panels.get((count, model))
            if panel is None:
                ax.text(0.5, 0.5, "not run", ha="center", va="center", fontsize=7, color="0.5")
                continue
            votes = np.asarray(panel["n_votes"], float)
            size = 2 + 10 * votes / max(votes.max(), 1)
            alpha = np.clip(0.15 + 0.6 * votes / max(votes.max(), 1), 0, 1)
            colors = np.zeros((len(votes), 4))
            colors[:, :3] = (0.12, 0.35, 0.65)
            colors[:, 3] = alpha
            ax.scatter(panel["p_true"], panel["p_pred"], s=size, c=colors, linewidths=0)
            m = panel["metrics"]
            ax.text(0.03, 0.97, "\n".join([f"Acc {m['accuracy']:.3f}", f"Prec {m['precision']:.3f}",
                                           f"Rec {m['recall']:.3f}", f"AUC {m['auc']:.3f}",
                                           f"η {100 * m['eta']:.2f}%"]),
                    transform=ax.transAxes, va="top", fontsize=6, family="monospace",
                    bbox=dict(facecolor="white", alpha=0.7, lw=0))
            if i == 0:
                ax.set_title(MODEL_LABELS.get(model, model), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{count:,} labels\npredicted P", fontsize=7)
            if i == len(counts) - 1:
                ax.set_xlabel("volunteers' P", fontsize=7)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.tick_params(labelsize=6)
    if question_text:
        fig.suptitle(question_text, fontsize=8)
    return fig


def label_curves(series, metric_label: str, ax=None, xlabel: str = "training labels", logx: bool = True):
    """A metric against the number (or fraction) of training labels, one line per model, with
    the spread over seeds as error bars. series: ``{model: (x, mean, std)}``."""
    if ax is None:
        fig = Figure(figsize=(3.2, 2.5), layout="constrained")
        ax = fig.subplots()
    for model, (x, mean, std) in series.items():
        ax.errorbar(x, mean, yerr=std, marker="o", ms=3, lw=1, capsize=2, label=MODEL_LABELS.get(model, model),
                    color=MODEL_COLORS.get(model), ls="--" if model == "photometry" else "-")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel, fontsize=7)
    ax.set_ylabel(metric_label, fontsize=7)
    ax.tick_params(labelsize=6)
    return ax.figure


def photoz_scatter(panels, z_max: float, size: float = 3.0) -> Figure:
    """Photometric against spectroscopic redshift (paper Figure 5), as a 2-D histogram per
    model, with sigma_MAD, bias and eta inlaid. panels: ``{title: (z_spec, z_phot, metrics)}``."""
    from matplotlib.colors import LogNorm

    fig = Figure(figsize=(size * len(panels), size), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    bins = np.linspace(0, z_max, 61)
    for ax, (title, (zs, zp, m)) in zip(axes, panels.items()):
        h = ax.hist2d(zs, zp, bins=[bins, bins], cmap="viridis", norm=LogNorm(), rasterized=True)
        ax.plot([0, z_max], [0, z_max], color="w", lw=0.7)
        ax.set_aspect("equal")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("spectroscopic z", fontsize=7)
        ax.text(0.03, 0.97, f"σ_MAD {m['sigma_mad']:.4f}\n<Δz> {m['bias']:+.4f}\nη {100 * m['eta']:.2f}%",
                transform=ax.transAxes, va="top", fontsize=6, family="monospace", color="w")
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel("photometric z", fontsize=7)
    fig.colorbar(h[3], ax=axes, shrink=0.8, label="galaxies")
    return fig
