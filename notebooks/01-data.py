# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     notebook_metadata_filter: sdsscl
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
#   sdsscl:
#     depends: []
# ---

# %% [markdown]
# # Data: SDSS and the mock
#
# **Overview.** {cite:t}`hayat2021` train on 1.3 million SDSS DR12 galaxies
# {cite:p}`alam2015` with dereddened Petrosian r ≤ 17.8: 517,190 with a spectroscopic
# redshift (the *labelled* set) and 845,254 without (the *unlabelled* set), each a
# 107×107-pixel *ugriz* cutout (Appendix A). This chapter builds the data set of this run and
# sets it beside the paper's:
#
# 1. the labelled and unlabelled sets and their sky distribution (paper Figure 6);
# 2. a gallery of galaxies by morphology and redshift;
# 3. the distributions of the mock beside the real SDSS catalogue;
# 4. the labelled/unlabelled selection, the splits and the noise scale later chapters use.
#
# Unless the profile reads the authors' files (`paper`), the galaxies here are a **mock
# survey**: generated on this machine from 10,000 real SDSS main-sample galaxies shipped with
# `kcorrect`, written in the authors' file layout ({doc}`/book/09-dataset-details`). Every
# table says which numbers are the mock's and which the paper's.
#
# **Prerequisites.** None: this notebook makes the mock itself if it is missing.

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"mock.seed": 7}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
import matplotlib.pyplot as plt
import numpy as np

from sdsscl.config import load_profile
from sdsscl.constants import BANDS, R_BAND, R_SF11, ebv_from_extinction, nmgy_to_mag
from sdsscl.data import SurveyDataset, gz2_min_votes, has_specz
from sdsscl.gz2 import TREE
from sdsscl.mock import load_reference_catalog, summarize_mock
from sdsscl.paper import DATASET
from sdsscl.plotting import show_galaxies
from sdsscl.provenance import (Provenance, Table, data_files, ensure_mock, run_paths, save_figure, training_mad,
                               write_metrics, write_splits)

cfg = load_profile(profile, overrides)
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
is_mock = cfg.data.source == "mock"
if is_mock:
    ensure_mock(cfg, paths, progress=False)  # a no-op when `make book` has made it already
files = data_files(cfg, paths)
survey_files = sorted(set(files["unlabelled"]) | set(files["labelled"]))
survey = SurveyDataset(survey_files)
here = f"mock, profile {cfg.run_name}" if is_mock else f"real files, profile {cfg.run_name}"
rng = np.random.default_rng(cfg.seed)
plt.rcParams.update({"figure.dpi": cfg.book.dpi, "savefig.dpi": cfg.book.dpi, "font.size": 9})

# %% [markdown]
# ## The labelled and unlabelled sets
#
# A galaxy is *labelled* when it has a spectroscopic redshift (`specz_redshift` finite,
# `specObjID` not -1). The morphology labels are Galaxy Zoo 2 votes {cite:p}`willett2013`; the
# paper trains on every galaxy with at least 5 votes for a question (Appendix C.1). The
# authors' files carry no GZ2 votes; the mock carries simulated ones.

# %%
ra, dec = survey.column("ra"), survey.column("dec")
specz = survey.column("specz_redshift")
labelled = has_specz(specz)
ebv = ebv_from_extinction(survey.column("e_bv"))
has_gz2 = all(f"gz2/{q.name}/votes" in info.shapes for info in survey.infos for q in TREE)
gz2_counts = {q.name: int(gz2_min_votes(survey, q.name, cfg.data.gz2_min_votes).sum()) for q in TREE} \
    if has_gz2 else {}
n_total, n_lab = len(survey), int(labelled.sum())
paper_total = DATASET.labelled + DATASET.unlabelled
rows = [
    ("galaxies", n_total, paper_total),
    ("spec-z labelled", n_lab, DATASET.labelled),
    ("unlabelled", n_total - n_lab, DATASET.unlabelled),
    ("labelled fraction", n_lab / n_total, DATASET.labelled / paper_total),
    ("GZ2 classified and matched to images", int((survey.column("gz2/n_volunteers") > 0).sum()) if has_gz2 else None,
     DATASET.gz2_matched),
]
rows += [(f"GZ2 labels, question '{q}' (>= {cfg.data.gz2_min_votes} votes)", n, None) for q, n in gz2_counts.items()]
Table(("set", here, "paper (Appendix A, C.1)"), tuple(rows), prov, caption="Galaxies in each set")

# %% [markdown]
# ### Sky distribution (paper Figure 6)
#
# The paper's Figure 6 shows where its unlabelled (left) and labelled (right) galaxies lie on
# the sky. The same two panels for this run follow; at most `book.sky_max_points` galaxies are
# drawn per panel.


# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 6: the sky distribution of the unlabelled (left) and spec-z labelled (right) galaxies, here of this run's data set (see the provenance line: MOCK or real). Made by notebook 01-data.", "name": "fig-sky"}}
def mollweide_x(ra_deg):
    """RA in degrees to Mollweide longitude in radians, increasing to the left as on the sky."""
    return -np.radians(np.where(ra_deg > 180, ra_deg - 360, ra_deg))


fig, axes = plt.subplots(1, 2, figsize=(10, 2.9), subplot_kw={"projection": "mollweide"}, layout="constrained")
for ax, mask, title in ((axes[0], ~labelled, "unlabelled"), (axes[1], labelled, "spec-z labelled")):
    idx = np.flatnonzero(mask)
    if idx.size > cfg.book.sky_max_points:
        idx = np.sort(rng.choice(idx, cfg.book.sky_max_points, replace=False))
    ax.scatter(mollweide_x(ra[idx]), np.radians(dec[idx]), s=1, alpha=0.5, lw=0, rasterized=True)
    ax.set_title(f"{title}: {mask.sum():,} galaxies", fontsize=9)
    ax.set_xticks(np.radians([-120, -60, 0, 60, 120]))
    ax.set_xticklabels(["120°", "60°", "0°", "300°", "240°"], fontsize=7)
    ax.set_yticks(np.radians([-60, -30, 0, 30, 60]))
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(alpha=0.3)
save_figure(fig, "sky_distribution", paths, prov, cfg.book.dpi)

# %% [markdown]
# ## Galaxies by morphology and redshift
#
# Lupton *gri* composites {cite:p}`lupton2004`, as the paper shows galaxies (Section 3.1),
# of spec-z labelled galaxies drawn at random in each redshift bin (`book.gallery_redshift_bins`).
# The rows use the mock generator's *true* morphology; the authors' files have none, so the
# gallery is drawn only for the mock. The images are as stored: not de-reddened.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Mock galaxies by true morphology (rows: smooth, then disk) and spec-z bin (columns), as Lupton gri composites. The paper has no such figure; its Figures 2 and 7 show real SDSS galaxies the same way. Made by notebook 01-data.", "name": "fig-gallery"}}
if is_mock:
    morphology = survey.column("truth/morphology")
    names = ("smooth", "disk")
    edges = cfg.book.gallery_redshift_bins
    per = cfg.book.gallery_per_cell
    picks, titles = [], []
    for m, name in enumerate(names):
        for lo, hi in zip(edges[:-1], edges[1:]):
            cell = np.flatnonzero(labelled & (morphology == m) & (specz >= lo) & (specz < hi))
            chosen = np.sort(rng.choice(cell, min(per, cell.size), replace=False))
            chosen = chosen[np.argsort(specz[chosen], kind="stable")]  # low to high redshift
            for k in range(per):
                picks.append(int(chosen[k]) if k < len(chosen) else -1)
                titles.append(f"{name} z={specz[chosen[k]]:.2f}" if k < len(chosen) else f"{name}: none")
    blank = np.full((len(BANDS),) + survey[0]["image"].shape[1:], np.nan, np.float32)
    images = np.stack([survey[i]["image"].numpy() if i >= 0 else blank for i in picks])
    fig = show_galaxies(images, titles=titles, ncols=per * (len(edges) - 1), panel_size=1.15)
    save_figure(fig, "gallery", paths, prov, cfg.book.dpi)
    display(fig)
else:
    print("The authors' files carry no morphology: no gallery for real files.")

# %% [markdown]
# ## The mock beside the real SDSS catalogue
#
# The mock draws its galaxies from the 10,000 real SDSS main-sample galaxies that ship with
# `kcorrect` (spectroscopic redshift, model and Petrosian photometry, Galactic extinction).
# The same functions compute each statistic for both (`sdsscl.mock.summarize_mock`).
# Magnitudes are dereddened; D is the two-sample Kolmogorov–Smirnov statistic (0: identical
# distributions). The paper reports no such statistics; its selection cuts are set beside
# the mock's in the table of the labelled selection below.

# %%
if is_mock:
    summary = summarize_mock(paths.mock)
    mock_s, sdss_s, ks = summary["mock"], summary["sdss"], summary["ks"]
    catalog = SurveyDataset(paths.mock, columns=("catalog/petro_mag", "catalog/model_flux", "catalog/model_snr",
                                                 "truth/redshift"), validate=False)
    dim = 10 ** (0.4 * R_SF11[None, :] * ebv[:, None])  # undo the Galactic dimming (the paper's recipe)
    mock_r = catalog.column("catalog/petro_mag")[:, R_BAND] - 2.5 * np.log10(dim[:, R_BAND])
    mock_mag = nmgy_to_mag(catalog.column("catalog/model_flux") * dim)
    mock_z = catalog.column("truth/redshift")
    mock_snr_r = catalog.column("catalog/model_snr")[:, R_BAND]
    ref = load_reference_catalog()
    ref_mag = nmgy_to_mag(ref["model_flux"] * 10 ** (0.4 * ref["extinction"]))
    pct = ("5%", "25%", "50%", "75%", "95%")
    rows = [("galaxies", mock_s["n"], sdss_s["n"], None),
            ("redshift, median", mock_s["z_median"], sdss_s["z_median"], ks["z"])]
    rows += [(f"Petrosian r, {p}", m, s, ks["r_petro"] if p == "50%" else None)
             for p, m, s in zip(pct, mock_s["r_petro_percentiles_5_25_50_75_95"],
                                sdss_s["r_petro_percentiles_5_25_50_75_95"])]
    rows += [("g - r, median", mock_s["g_r_median"], sdss_s["g_r_median"], ks["g_r"]),
             ("g - r bimodality coefficient", mock_s["g_r_bimodality_coefficient"],
              sdss_s["g_r_bimodality_coefficient"], None),
             ("red-sequence fraction", mock_s["red_fraction"], sdss_s["red_fraction"], None)]
    rows += [(f"model S/N {b}, median", m, s, None)
             for b, m, s in zip(BANDS, mock_s["snr_median_ugriz"], sdss_s["snr_median_ugriz"])]
    table = Table(("statistic", here, "real SDSS (kcorrect, 10,000 galaxies)", "KS D"), tuple(rows), prov,
                  caption="Mock and real SDSS photometry", digits=3)
else:
    summary = None
    table = "Catalogue comparisons need the mock's catalog/ group; the authors' files hold images only."
table

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Distributions of the mock (filled) beside the real SDSS main-sample galaxies shipped with kcorrect (line): redshift, dereddened Petrosian r, dereddened model g - r and r-band model S/N. The paper has no such figure. Made by notebook 01-data.", "name": "fig-distributions"}}
if is_mock:
    panels = (("redshift", mock_z, ref["z"], np.linspace(0, 0.35, 36)),
              ("Petrosian r (dereddened)", mock_r, ref["petro_mag_dered"][:, R_BAND], np.linspace(13, 18, 41)),
              ("g - r (model, dereddened)", mock_mag[:, 1] - mock_mag[:, 2], ref_mag[:, 1] - ref_mag[:, 2],
               np.linspace(0, 1.4, 36)),
              ("log10 S/N (r, model)", np.log10(mock_snr_r), np.log10(ref["model_snr"][:, R_BAND]),
               np.linspace(0.5, 4, 36)))
    fig, axes = plt.subplots(1, 4, figsize=(11, 2.6), layout="constrained")
    for ax, (label, mock_values, real_values, bins) in zip(axes, panels):
        ax.hist(mock_values, bins, density=True, alpha=0.5, label="mock")
        ax.hist(real_values, bins, density=True, histtype="step", lw=1.5, color="k", label="real SDSS")
        ax.set_xlabel(label)
        ax.set_yticks([])
    axes[0].legend(fontsize=7, frameon=False)
    save_figure(fig, "mock_vs_sdss", paths, prov, cfg.book.dpi)

# %% [markdown]
# ## The labelled and unlabelled selection
#
# Spectroscopic targets are chosen by flux and quality cuts {cite:p}`strauss2002`, so the
# paper notes that labelled galaxies are biased toward nearby, bright objects with low
# Galactic extinction (Section 4). The mock's spectroscopic selection (footprint, magnitude
# limit, completeness) is compared with that statement below; redshifts of unlabelled mock
# galaxies are the generator's truth, which a real survey would not know.

# %%
if is_mock:
    labels = summary["labels"]
    rows = (
        ("labelled fraction", labels["labelled_fraction"], labels["paper_labelled_fraction"]),
        ("median Petrosian r, labelled", labels["r_median_labelled"], None),
        ("median Petrosian r, unlabelled", labels["r_median_unlabelled"], None),
        ("median E(B-V), labelled", labels["ebv_median_labelled"], None),
        ("median E(B-V), unlabelled", labels["ebv_median_unlabelled"], None),
        ("median true redshift, labelled", float(np.median(mock_z[labelled])), None),
        ("median true redshift, unlabelled", float(np.median(mock_z[~labelled])), None),
        ("largest dereddened Petrosian r", float(np.max(mock_r)), DATASET.r_petro_max),
        ("largest spec-z", float(np.nanmax(specz)), DATASET.z_spec_max),
    )
    table = Table(("quantity", here, "paper (Appendix A)"), rows, prov, caption="The labelled selection", digits=3)
else:
    table = Table(("quantity", here, "paper (Appendix A)"),
                  (("labelled fraction", n_lab / n_total, DATASET.labelled / paper_total),
                   ("largest spec-z", float(np.nanmax(specz)), DATASET.z_spec_max)), prov, digits=3)
table

# %% tags=["hide-input"] mystnb={"figure": {"caption": "The labelled selection of this run: dereddened Petrosian r, E(B-V) and redshift of the spec-z labelled (filled) and unlabelled (line) galaxies. The paper has no such figure; it states the bias in words (Section 4). Made by notebook 01-data.", "name": "fig-selection"}}
if is_mock:
    panels = (("Petrosian r (dereddened)", mock_r, np.linspace(13, 18, 41)),
              ("E(B-V)", ebv, np.linspace(0, float(np.quantile(ebv, 0.99)), 31)),
              ("true redshift", mock_z, np.linspace(0, 0.35, 36)))
    fig, axes = plt.subplots(1, 3, figsize=(9, 2.6), layout="constrained")
    for ax, (label, values, bins) in zip(axes, panels):
        ax.hist(values[labelled], bins, density=True, alpha=0.5, label="spec-z labelled")
        ax.hist(values[~labelled], bins, density=True, histtype="step", lw=1.5, color="k", label="unlabelled")
        ax.set_xlabel(label)
        ax.set_yticks([])
    axes[0].legend(fontsize=7, frameon=False)
    save_figure(fig, "labelled_selection", paths, prov, cfg.book.dpi)

# %% [markdown]
# ## Splits and the noise scale
#
# The labelled galaxies are split at random into training, validation and test sets by
# ObjID (`data.split`, `data.split_seed`; the paper holds out 20% for testing and 10% for
# validation, Appendix C.2), and saved to `runs/<profile>/splits.json` for the later
# chapters. The Gaussian-noise augmentation scales with each band's median absolute
# deviation over the training images (Section 2); it is computed here over
# `data.mad_subsample` galaxies (all of them when null).

# %%
fractions = {"train": cfg.data.split.train, "val": cfg.data.split.val, "test": cfg.data.split.test}
splits = write_splits(cfg, paths, survey.subset(labelled))
mad = training_mad(cfg, paths, survey)
rows = [(f"labelled {name}", len(ids), fractions[name]) for name, ids in splits.items()]
rows += [(f"band MAD {b} (nmgy)", float(v), None) for b, v in zip(BANDS, mad)]
Table(("quantity", here, "fraction"), tuple(rows), prov, caption="Splits and per-band MAD", digits=3)

# %% [markdown]
# The paper's photo-z fine-tuning uses 400,000 labelled images for training and 103,000 for
# validation (Appendix A); its MAD values are not given.
#
# All the numbers of this chapter, with their provenance, go to `runs/<profile>/metrics/data.json`.

# %%
metrics = {
    "n_galaxies": n_total, "n_labelled": n_lab, "n_unlabelled": n_total - n_lab,
    "gz2_labels_min_votes": gz2_counts,
    "splits": {name: len(ids) for name, ids in splits.items()},
    "band_mad_nmgy": dict(zip(BANDS, mad.tolist())),
    "summary": summary,
    "paper": {"n_labelled": DATASET.labelled, "n_unlabelled": DATASET.unlabelled},
}
record = write_metrics("data", metrics, paths, prov)
print(f"wrote {record.relative_to(paths.root.parent)}")

# %% [markdown]
# ## Summary
#
# This run's data set, its labelled and unlabelled sets and its splits are fixed here; the
# sky map stands in for paper Figure 6. On the mock, sizes and fractions differ from the
# paper's by construction (profile `mock.n_galaxies`), and its photometry follows the real
# SDSS catalogue to the degree the tables above show.
#
# **What next.** {doc}`02-augmentations` applies the paper's
# augmentations to these galaxies.
