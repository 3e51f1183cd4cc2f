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
#     depends: [03-moco]
# ---

# %% [markdown]
# # The representation space
#
# **Overview.** The paper looks at what its encoder learned by projecting the 2048-d
# representations of all 1.3 million galaxies to two dimensions with UMAP
# {cite:p}`mcinnes2018` (Section 3.1): an image mosaic of the map and the same map coloured by
# Galaxy Zoo 2 vote fractions {cite:p}`willett2013`, spectroscopic redshift and label type
# (paper Figure 2). Appendix B sets it beside a UMAP of the raw pixels (Figure 8), follows ten
# galaxies through both maps under rotation, jitter and noise (Figure 9), and colours both
# maps by Petrosian magnitude and radius (Figure 10). This chapter does the same for this
# run's encoder and galaxies:
#
# 1. the representation of every galaxy ({doc}`03-moco`'s encoder, the 64×64 centre crop);
# 2. the two maps, representations (cosine) and pixels (euclidean), fitted as the paper did on
#    a random 5% of the galaxies;
# 3. Figures 2, 8 and 10, and a number for each coloured panel: how well a galaxy's map
#    neighbours predict its label;
# 4. Figure 9, with the distances the copies move in each space as a table;
# 5. an interactive version of the representation map.
#
# Everything computed here is this run's (**mock** unless the profile reads the authors'
# files); the paper's own findings are quoted, as such, at the end.
#
# **Prerequisites.** {doc}`03-moco` (the pretrained encoder); {doc}`01-data` (the labels).

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"representations.umap_n_neighbors": 30}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
# %matplotlib inline
import json

import h5py
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import HTML, Markdown, display
from sklearn.neighbors import NearestNeighbors

from sdsscl.checkpoint import load_encoder
from sdsscl.config import load_profile
from sdsscl.constants import R_BAND
from sdsscl.data import gz2_min_votes, has_specz
from sdsscl.gz2 import TREE
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
)
from sdsscl.provenance import (
    Provenance,
    Table,
    run_paths,
    save_figure,
    training_mad,
    write_metrics,
)
from sdsscl.representations import (
    encode,
    load_representations,
    profile_dataset,
    run_extraction,
)
from sdsscl.search import example_queries

cfg = load_profile(profile, overrides)
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
rcfg = cfg.representations
crop = cfg.augment.crop_size
is_mock = cfg.data.source == "mock"
here = f"{'mock' if is_mock else 'real files'}, profile {cfg.run_name}"
plt.rcParams.update({"figure.dpi": cfg.book.dpi, "savefig.dpi": cfg.book.dpi, "font.size": 9})

# %% [markdown]
# ## The representations
#
# Each galaxy's representation is the encoder's average-pool output for its raw 107×107
# cutout, centre-cropped to the 64×64 the network saw in training (no augmentation), stored in
# `runs/<profile>/representations/moco.h5` (`sdsscl.representations`). The file records the
# checkpoint's hash: it is computed once per checkpoint and reused afterwards.

# %%
reps_file = run_extraction(cfg, runs_dir, progress=False)
survey = profile_dataset(cfg, paths)
reps = load_representations(reps_file, survey)
Table(("quantity", here), (
    ("galaxies", len(reps)),
    ("representation dimension D (paper: 2048)", reps.dim),
    ("stored as", reps.attrs["dtype"]),
    ("file", str(reps_file.relative_to(paths.shared))),
), prov, caption="The representations of this run")


# %% [markdown]
# ## The labels the maps are coloured by
#
# The paper colours its map by GZ2 vote fractions ("the fraction of votes for one answer over
# the other"), by spectroscopic redshift and by label type (spec-z, GZ2, both or none). Here the
# vote fractions are those of the three questions the paper predicts (Section 3.2): the
# fraction of the question's two answers given to the first, for galaxies with at least
# `data.gz2_min_votes` votes (Appendix C.1). The mock also carries the Petrosian catalogue of
# Figure 10 and its generator's true morphology. The authors' files carry no GZ2 votes, no
# catalogue and no truth: there those panels are skipped.

# %%
def has_column(name):
    return all(name in info.shapes for info in survey.infos)


specz = survey.column("specz_redshift").astype(np.float64)
labelled = has_specz(specz)
gz2_panels = {}
if has_column(f"gz2/{TREE[0].name}/votes"):
    for q in TREE:
        votes = survey.column(f"gz2/{q.name}/votes")
        p = q.binary_fraction(votes)
        p[~gz2_min_votes(votes, q.name, min_votes=cfg.data.gz2_min_votes)] = np.nan
        gz2_panels[f"GZ2 {q.name.replace('_', '-')}: P({q.positive})"] = p
has_gz2 = np.isfinite(next(iter(gz2_panels.values()))) if gz2_panels else np.zeros(len(survey), bool)
types = label_type(labelled, has_gz2)
catalogue = {}
if has_column("catalog/petro_mag") and has_column("catalog/petro_r90"):
    catalogue = {"Petrosian r (mag)": survey.column("catalog/petro_mag")[:, R_BAND].astype(np.float64),
                 "Petrosian R90 (arcsec)": survey.column("catalog/petro_r90").astype(np.float64)}
truth = {}
if is_mock:
    with h5py.File(survey.files[0], "r") as f:
        morphology_names = np.array(json.loads(f["truth/morphology"].attrs["names"]))
    truth["true morphology (mock)"] = morphology_names[survey.column("truth/morphology")]
kinds, counts = np.unique(types, return_counts=True)
Table(("label type", here), tuple(zip(kinds.tolist(), counts.tolist())), prov, caption="Galaxies by label type")

# %% [markdown]
# ## Two maps: the representations and the pixels
#
# Both maps follow Appendix B.2: UMAP is fitted on a random `representations.umap_fit_fraction`
# of the galaxies (5%, at least `umap_min_fit`), and the fitted transformation places the
# others. The **representation map** (cosine metric: the contrastive loss and the similarity
# search compare directions) places every galaxy. The **pixel map** (euclidean, on the
# flattened 5×64×64 centre crops, 20,480 numbers per galaxy) is fitted on the *same* random
# galaxies, as the paper fitted both maps on 5% "to facilitate a fair comparison", and shows
# only those: umap-learn places a 20,480-d vector in ~10 ms on one core, so placing all the
# galaxies of the default run would take minutes; the paper placed all its 1.3 million.

# %%
rep_map = fit_umap(reps.vectors, rcfg.umap_fit_fraction, rcfg.umap_min_fit, rcfg.umap_n_neighbors,
                   rcfg.umap_min_dist, seed=cfg.seed, metric="cosine")
sample = rep_map.fit_indices  # positions in the survey of the galaxies both maps are fitted on
sample_pixels = pixel_vectors(survey.subset(sample), crop_size=crop)  # (n_fit, 5 * crop * crop)
pix_map = fit_umap(sample_pixels, 1.0, rcfg.umap_min_fit, rcfg.umap_n_neighbors, rcfg.umap_min_dist,
                   seed=cfg.seed, metric="euclidean")
Table(("map", "input", "metric", "fitted on", "galaxies shown"), (
    ("representations", f"{reps.dim}-d representation", "cosine", f"{sample.size:,} random galaxies",
     f"all {len(survey):,}"),
    ("pixels", f"{sample_pixels.shape[1]:,} fluxes (5 x {crop} x {crop})", "euclidean", "the same galaxies",
     f"those {sample.size:,}"),
), prov, caption=f"The two UMAPs ({rcfg.umap_n_neighbors} neighbours, min_dist {rcfg.umap_min_dist})")


# %%
def point_size(n):
    """Scatter marker area for n points: small for a crowded map, larger for a sparse one."""
    return float(np.clip(40_000 / max(n, 1), 2, 12))


label_panels = {**gz2_panels, "spec-z": specz, "label type": types, **truth}

# %% [markdown]
# ### The representation map (paper Figure 2)
#
# Left half of Figure 2: the map binned into `representations.mosaic_cells` square cells per
# side (the paper: 128), one randomly chosen galaxy shown per occupied cell, Lupton *gri*
# {cite:p}`lupton2004` of the 64×64 crop the network sees.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 2 (left): the UMAP of this run's representations as an image mosaic, one random galaxy per cell. Made by notebook 04-representation-space.", "name": "fig-rep-mosaic"}}
rep_mosaic = mosaic(rep_map.embedding, rcfg.mosaic_cells, seed=cfg.seed)
fig = plot_mosaic(rep_mosaic, survey.subset(rep_mosaic.indices), crop_size=crop, size=6.0)
save_figure(fig, "umap_representations_mosaic", paths, prov, cfg.book.dpi)
display(fig)

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 2 (right): the representation UMAP coloured by GZ2 vote fractions, spectroscopic redshift and label type (grey: no label), and on the mock by the generator's true morphology. Made by notebook 04-representation-space.", "name": "fig-rep-labels"}}
fig = plot_colored(rep_map.embedding, label_panels, point_size=point_size(len(survey)), seed=cfg.seed)
save_figure(fig, "umap_representations_labels", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ### The pixel map (paper Figure 8)
#
# The same two views of the pixel UMAP, for the galaxies it was fitted on. (The paper shows only
# labelled galaxies in Figure 8; here unlabelled ones are drawn grey in the coloured panels.)

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 8 (left): the UMAP of the flattened 64x64 pixels of this run's galaxies (the random 5% the maps are fitted on) as an image mosaic. Made by notebook 04-representation-space.", "name": "fig-pix-mosaic"}}
pix_mosaic = mosaic(pix_map.embedding, rcfg.mosaic_cells, seed=cfg.seed)
fig = plot_mosaic(pix_mosaic, survey.subset(sample[pix_mosaic.indices]), crop_size=crop, size=6.0)
save_figure(fig, "umap_pixels_mosaic", paths, prov, cfg.book.dpi)
display(fig)

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 8 (right): the pixel UMAP coloured by the labels of Figure 2 (grey: no label). Made by notebook 04-representation-space.", "name": "fig-pix-labels"}}
fig = plot_colored(pix_map.embedding, {k: v[sample] for k, v in label_panels.items()},
                   point_size=point_size(sample.size), seed=cfg.seed)
save_figure(fig, "umap_pixels_labels", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ### Size and brightness (paper Figure 10)
#
# Both maps coloured by the Petrosian r magnitude and the radius R90 containing 90% of the
# Petrosian flux (catalogue columns: the mock has them, the authors' files do not).

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 10 (left): the representation UMAP coloured by Petrosian r magnitude and R90 radius. Made by notebook 04-representation-space.", "name": "fig-rep-size"}}
if catalogue:
    fig = plot_colored(rep_map.embedding, catalogue, ncols=2, point_size=point_size(len(survey)), seed=cfg.seed)
    save_figure(fig, "umap_representations_size", paths, prov, cfg.book.dpi)
    display(fig)
else:
    print("No Petrosian catalogue in these files: Figure 10 needs catalog/petro_mag and catalog/petro_r90.")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 10 (right): the pixel UMAP coloured by Petrosian r magnitude and R90 radius. Made by notebook 04-representation-space.", "name": "fig-pix-size"}}
if catalogue:
    fig = plot_colored(pix_map.embedding, {k: v[sample] for k, v in catalogue.items()}, ncols=2,
                       point_size=point_size(sample.size), seed=cfg.seed)
    save_figure(fig, "umap_pixels_size", paths, prov, cfg.book.dpi)
    display(fig)
else:
    print("No Petrosian catalogue in these files: Figure 10 needs catalog/petro_mag and catalog/petro_r90.")

# %% [markdown]
# ### What the colours say, as numbers
#
# Whether a label varies smoothly across a map can be read off a panel by eye; the table puts
# a number on it. For each map and each label, every galaxy's label is predicted by the mean
# label of its `representations.umap_n_neighbors` nearest galaxies *in the 2-D map* (the
# neighbourhood size UMAP preserves; among those with the label, itself excluded), and the score
# is the fraction of the label's variance this explains ($R^2$). 1: the map position says
# everything; about $-1/k$: nothing (the mean of $k$ unrelated labels is a slightly worse guess
# than the overall mean). Both maps are scored on the same galaxies, those both were fitted on.
# For the binary true morphology, $R^2$ is the Brier skill score of the neighbours' vote.

# %%
def map_r2(xy, values, k):
    """R^2 of predicting each point's value by the mean of its k nearest other points in xy."""
    values = np.asarray(values, np.float64)
    ok = np.isfinite(values)
    if ok.sum() <= k + 1 or np.var(values[ok]) == 0:
        return float("nan"), int(ok.sum())
    y = values[ok]
    _, nb = NearestNeighbors(n_neighbors=k).fit(xy[ok]).kneighbors()  # (n, k), itself excluded
    return float(1 - np.sum((y - y[nb].mean(axis=1)) ** 2) / np.sum((y - y.mean()) ** 2)), int(ok.sum())


numeric = {**gz2_panels, "spec-z": specz, **catalogue}
if truth:
    numeric["true morphology (mock): disk"] = (truth["true morphology (mock)"] == "disk").astype(np.float64)
smoothness, rows = {}, []
for name, values in numeric.items():
    r2_rep, n_lab = map_r2(rep_map.embedding[sample], values[sample], rcfg.umap_n_neighbors)
    r2_pix, _ = map_r2(pix_map.embedding, values[sample], rcfg.umap_n_neighbors)
    smoothness[name] = {"representation_map": r2_rep, "pixel_map": r2_pix, "galaxies": n_lab}
    rows.append((name, n_lab, r2_rep, r2_pix))
Table(("label", "galaxies with it", "R² representation map", "R² pixel map"), tuple(rows), prov,
      caption=f"How well {rcfg.umap_n_neighbors} map neighbours predict a label ({here})", digits=3)

# %%
scored = {n: s for n, s in smoothness.items() if np.isfinite(s["representation_map"]) and np.isfinite(s["pixel_map"])}
better = [n for n, s in scored.items() if s["representation_map"] > s["pixel_map"]]
worse = [n for n, s in scored.items() if s["representation_map"] <= s["pixel_map"]]
best = {m: max(scored, key=lambda n: scored[n][m]) for m in ("representation_map", "pixel_map")} if scored else {}
Markdown(f"On this run ({here}), the representation map predicts {len(better)} of the {len(scored)} labels "
         f"better than the pixel map" + (f" ({', '.join(better)})" if better else "")
         + (f", and the pixel map does as well or better for {', '.join(worse)}." if worse else ".")
         + (f" The label the representation map follows most closely is {best['representation_map']} "
            f"(R² {scored[best['representation_map']]['representation_map']:.2f}); the pixel map's is "
            f"{best['pixel_map']} (R² {scored[best['pixel_map']]['pixel_map']:.2f})." if best else ""))

# %% [markdown]
# ## Stationarity under augmentations (paper Figure 9)
#
# The paper follows the ten galaxies of its similarity-search figure through both maps while
# rotating them (0° to 315° in steps of 45°), moving the crop from (−7, −7) to (7, 7) pixels
# in 7 steps, and adding Gaussian noise of 0 to 3 times the per-band MAD in 7 steps
# (Appendix B.2; `sdsscl.maps.augmented_copies`). The galaxies here are
# `representations.stationarity_galaxies` examples chosen by one rule,
# `sdsscl.search.example_queries` (random candidates drawn with the run's seed, kept at evenly
# spaced ranks of central r-band flux, brightest first): the same galaxies, in the same colours,
# as the query galaxies of {doc}`07-similarity-search`.
#
# The table measures how far the copies move: each copy's distance from the galaxy's
# un-augmented crop, averaged over the sweep and the galaxies, in units of the median distance
# between two random galaxies of the same space (`sdsscl.maps.stationarity`). 0: the copies
# do not move; 1: they move as far as to a random other galaxy. Cosine distance in the
# representation space, euclidean in pixel space and in both 2-D maps.

# %%
queries = example_queries(survey, rcfg.stationarity_galaxies, cfg.seed, crop_size=crop)
images = torch.stack([survey[int(i)]["image"] for i in queries])  # (G, 5, 107, 107)
mad = training_mad(cfg, paths, survey)
encoder, _ = load_encoder(paths.moco_checkpoint, cfg.pretrain.encoder)
copies, sweeps = {}, {}
for kind in STATIONARITY_KINDS:
    copies[kind], sweeps[kind] = augmented_copies(images, kind, mad=mad, seed=cfg.seed, crop_size=crop,
                                                  max_jitter=cfg.augment.max_jitter)  # (G, S, 5, crop, crop)
g = len(queries)
flat = torch.cat([copies[kind].flatten(0, 1) for kind in STATIONARITY_KINDS])  # (G * sum S, 5, crop, crop)
vectors = {"representations": (encode(encoder, images, crop).numpy(), encode(encoder, flat, crop).numpy()),
           "pixels": (pixel_vectors(images, crop_size=crop), flat.flatten(1).numpy())}
maps = {"representations": rep_map, "pixels": pix_map}
references = {"representations": (reps.vectors, rep_map.embedding), "pixels": (sample_pixels, pix_map.embedding)}
metric_of = {"representations": "cosine", "pixels": "euclidean"}
scores, placed = {}, {}
for space, (original, copied) in vectors.items():
    xy = maps[space].transform(np.concatenate([original, copied]))  # originals and copies in one batch
    split = np.cumsum([g * sweeps[kind].size for kind in STATIONARITY_KINDS])[:-1]
    per_kind = dict(zip(STATIONARITY_KINDS, np.split(copied, split)))
    per_kind_xy = dict(zip(STATIONARITY_KINDS, np.split(xy[g:], split)))
    high = {kind: v.reshape(g, sweeps[kind].size, -1) for kind, v in per_kind.items()}
    low = {kind: v.reshape(g, sweeps[kind].size, 2) for kind, v in per_kind_xy.items()}
    placed[space] = low
    scores[space] = stationarity(high, original, references[space][0], metric=metric_of[space], seed=cfg.seed)
    scores[f"{space} map"] = stationarity(low, xy[:g], references[space][1], metric="euclidean", seed=cfg.seed)
print(f"example galaxies (ObjID, brightest first): {[int(o) for o in survey.objids[queries]]}")
columns = ("representations", "pixels", "representations map", "pixels map")
rows = []
for kind in STATIONARITY_KINDS:
    rows.append((f"{kind}: mean over galaxies", *(scores[c]["per_kind"][kind] for c in columns)))
    rows.append((f"{kind}: the galaxy that moves most", *(float(scores[c]["per_galaxy"][kind].max())
                                                         for c in columns)))
rows.append(("all three, mean", *(scores[c]["mean"] for c in columns)))
Table(("augmentation", f"representation space ({reps.dim}-d, cosine)", "pixel space (euclidean)",
       "representation map (2-d)", "pixel map (2-d)"), tuple(rows), prov,
      caption="Distance the augmented copies move, in units of the median distance between two galaxies "
              f"({here}; lower: more stationary)", digits=3)

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 9: the example galaxies (one colour and marker each, as in Figure 7 of the similarity-search chapter) under rotation, jitter and noise, placed in the pixel UMAP (top) and the representation UMAP (bottom); grey: the map's galaxies. Made by notebook 04-representation-space.", "name": "fig-stationarity"}}
fig = plot_stationarity({"pixels": placed["pixels"], "representations": placed["representations"]},
                        {"pixels": pix_map.embedding, "representations": rep_map.embedding},
                        point_size=point_size(len(survey)) / 2)
save_figure(fig, "stationarity", paths, prov, cfg.book.dpi)
display(fig)

# %%
def times_less(a, b):
    """How many times less the copies move in space a than in space b, per kind, as text."""
    ratio = [scores[b]["per_kind"][k] / max(scores[a]["per_kind"][k], 1e-12) for k in STATIONARITY_KINDS]
    return ", ".join(f"{r:.1f}" for r in ratio)


Markdown(f"On this run ({here}), in units of the typical distance between two galaxies, the representations of "
         f"the augmented copies move {times_less('representations', 'pixels')} times less than their pixels under "
         f"{', '.join(STATIONARITY_KINDS)}; on the 2-D maps the factors are "
         f"{times_less('representations map', 'pixels map')}.")

# %% [markdown]
# ## An interactive map
#
# The paper suggests such maps for an interactive data portal (Section 3.1). Hover over a point
# for the galaxy (64×64 crop, Lupton *gri*) and its labels; a seeded random subset of at most
# 2,000 galaxies is shown to keep the page light (`sdsscl.maps.interactive_map`).

# %% tags=["nbval-ignore-output"]
hover = {"ObjID": survey.objids, "label type": types, "spec-z": specz, **gz2_panels, **catalogue, **truth}
HTML(interactive_map(rep_map.embedding, survey, hover, color_by="label type", seed=cfg.seed))

# %% [markdown]
# ## The numbers this chapter writes
#
# `runs/<profile>/metrics/representation_space.json` holds the stationarity scores, the map
# scores and what the maps were fitted on, with their provenance.

# %%
metrics = {
    "n_galaxies": len(reps), "dimension": reps.dim, "umap_fit_galaxies": int(sample.size),
    "pixel_map_galaxies": int(sample.size), "example_objids": survey.objids[queries],
    "stationarity": {space: {"per_kind": s["per_kind"], "mean": s["mean"],
                             "max_galaxy": {k: float(v.max()) for k, v in s["per_galaxy"].items()},
                             "pair_median": s["pair_median"], "metric": s["metric"]}
                     for space, s in scores.items()},
    "map_knn_r2": smoothness, "map_knn_k": rcfg.umap_n_neighbors,
}
record = write_metrics("representation_space", metrics, paths, prov)
print(f"wrote {record.relative_to(paths.root.parent)}")

# %% [markdown]
# ## What the paper reports (paper)
#
# These are {cite:t}`hayat2021`'s findings on 1.3 million real SDSS galaxies with a ResNet50
# (2048-d), quoted, not computed here:
#
# - The UMAP of the representations groups images by visual similarity (spiral or not, edge-on
#   or not); coloured by GZ2 vote fractions and spectroscopic redshift it shows distinct
#   clusters by morphology and redshift, "to the level where decision boundaries for a number of
#   GZ2 questions can be drawn by eye"; many unlabelled galaxies lie apart from any labelled one
#   (Section 3.1, Figure 2).
# - The UMAP of the pixels separates galaxies mainly by size and brightness; the first GZ2
#   question shows some separation there, more detailed morphology does not (Appendix B.2,
#   Figure 8).
# - Under rotation and jitter the ten example galaxies move across a large part of the pixel
#   map but stay nearly still in the representation map; the one exception is a galaxy whose
#   image streak leaves the 64² crop under a large jitter (Appendix B.2, Figure 9).
# - The representation map responds to both size and magnitude, since no size augmentation
#   or brightness normalisation was used (Appendix B.3, Figure 10).
#
# The paper gives these as figures and words, without numbers; the tables above are this
# project's way of putting numbers on the same statements, for this run. A mock's encoder is a
# small network trained for minutes on 2 CPU cores (see {doc}`03-moco`), not the paper's
# ResNet50 trained for 12 hours on 8 GPUs, so weaker structure here says little about the
# paper's claim.
#
# ## Reproduce
#
# ```bash
# .venv/bin/python scripts/extract_representations.py --profile default   # the representations (this chapter runs it too)
# torchrun --nproc_per_node=8 scripts/extract_representations.py --profile paper
# .venv/bin/python scripts/build_book.py run --profile default --only 04-representation-space
# ```
#
# ## Summary
#
# The representations of every galaxy are on disk, both maps of the paper are drawn for this
# run with the paper's recipe (fitted on 5%, same galaxies for both), and the statements of
# Section 3.1 and Appendix B are measured: how well each map's neighbourhoods predict each label,
# and how far augmented copies move in each space.
#
# **What next.** {doc}`05-morphology` and {doc}`06-photoz` use the representations
# for the downstream tasks; {doc}`07-similarity-search` searches them.
