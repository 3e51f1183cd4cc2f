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
# # Appendix: similarity search
#
# **Overview.** "Finding semantically similar images [...] corresponds to finding nearby data
# points in the 2048 dimensional representation space": the paper ranks all galaxies by the
# cosine similarity of their representation to a query's and shows ten queries with their five
# most similar galaxies (Appendix B.1, Figure 7). This chapter runs that search on this run's
# representations and measures what the figure can only suggest:
#
# 1. Figure 7 for example galaxies chosen by a fixed rule (the galaxies of Figure 9 in
#    {doc}`04-representation-space`);
# 2. whether a galaxy's nearest neighbours share its morphology and redshift, for neighbours
#    in the representation space against neighbours in pixel space and against random pairs;
# 3. how much of the exact search the approximate faiss indexes (IVF, HNSW) recover;
# 4. an anomaly ranking (distance to the k-th neighbour) and, on the mock, how well it finds
#    the galaxies generated with an artefact or a neighbour in the cutout.
#
# Every number is this run's (**mock** unless the profile reads the authors' files); the
# paper's findings are quoted, as such, at the end.
#
# **Prerequisites.** {doc}`03-moco` (the encoder); {doc}`04-representation-space` (the
# representations, and the same example galaxies).

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"representations.neighbours": 10}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
# %matplotlib inline
import json
import math

import h5py
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import Markdown, display
from sklearn.metrics import roc_auc_score

from sdsscl.config import load_profile
from sdsscl.constants import R_BAND
from sdsscl.data import gz2_min_votes
from sdsscl.gz2 import TREE
from sdsscl.maps import pixel_vectors
from sdsscl.plotting import show_galaxies
from sdsscl.provenance import Provenance, Table, run_paths, save_figure, write_metrics
from sdsscl.representations import load_representations, profile_dataset, run_extraction
from sdsscl.search import (
    SimilarityIndex,
    anomaly_scores,
    example_queries,
    find_similar,
    index_from_config,
    recall_at_k,
    set_faiss_threads,
)

cfg = load_profile(profile, overrides)
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
rcfg = cfg.representations
k = rcfg.neighbours
crop = cfg.augment.crop_size
is_mock = cfg.data.source == "mock"
here = f"{'mock' if is_mock else 'real files'}, profile {cfg.run_name}"
plt.rcParams.update({"figure.dpi": cfg.book.dpi, "savefig.dpi": cfg.book.dpi, "font.size": 9})

reps_file = run_extraction(cfg, runs_dir, progress=False)  # a no-op when the representations chapter made them
survey = profile_dataset(cfg, paths)
reps = load_representations(reps_file, survey)
n = len(survey)
print(f"{n:,} galaxies, {reps.dim}-d representations")


# %% [markdown]
# ## Query galaxies and their nearest neighbours (paper Figure 7)
#
# The paper hand-picked ten galaxies; here `representations.stationarity_galaxies` examples are
# chosen by `sdsscl.search.example_queries` (random candidates drawn with the run's seed, kept
# at evenly spaced ranks of central r-band flux, brightest first), the same galaxies in the same
# colours as Figure 9 of {doc}`04-representation-space`. Each row shows a query (framed) and its
# `representations.neighbours` most similar galaxies by cosine similarity (written on each),
# from the profile's index (`representations.search_index`; `flat` is the paper's exact
# search). The whole 107×107 cutouts are shown; the square is the 64×64 crop the network sees.
# `scripts/similar.py` draws the same figure from the command line.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Reproduces paper Figure 7: example galaxies of this run (left, framed) and their most similar galaxies by cosine similarity of the representations (similarity written on each); squares outline the 64x64 pixels the network sees. Made by notebook 07-similarity-search.", "name": "fig-similar"}}
queries = example_queries(survey, rcfg.stationarity_galaxies, cfg.seed, crop_size=crop)
result, fig = find_similar(cfg, queries, by="index", k=k, runs_dir=runs_dir)
save_figure(fig, "similarity_search", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# What the rows share can be read off the labels. On the mock, each galaxy has a true
# morphology and redshift from the generator; the table gives, per query, how many of its
# neighbours have the query's morphology and how far their redshifts are. The similarities are
# best read against that of two random galaxies, printed first.

# %%
def has_column(name):
    return all(name in info.shapes for info in survey.infos)


def names_of(key):
    """The category names of an int-coded truth column of the mock (its attribute "names")."""
    with h5py.File(survey.files[0], "r") as f:
        return np.array(json.loads(f[key].attrs["names"]))


morphology = survey.column("truth/morphology").astype(np.int64) if is_mock else None
redshift = (survey.column("truth/redshift") if is_mock else survey.column("specz_redshift")).astype(np.float64)
redshift_name = "true redshift (mock)" if is_mock else "spectroscopic redshift"
rows = []
for i, (q, nb, sim) in enumerate(zip(queries, result.indices, result.similarity)):
    dz = np.abs(redshift[nb] - redshift[q])
    row = (i + 1, str(survey.objids[q]), f"{sim.min():.4f}", f"{sim.max():.4f}")
    if is_mock:
        row += (names_of("truth/morphology")[morphology[q]], f"{int((morphology[nb] == morphology[q]).sum())}/{k}")
    rows.append(row + (float(redshift[q]), float(np.nanmedian(dz)) if np.isfinite(dz).any() else None))
headers = ("row", "query ObjID", "lowest similarity", "highest similarity")
if is_mock:
    headers += ("query morphology (mock truth)", "neighbours sharing it")
unit = reps.vectors / np.linalg.norm(reps.vectors, axis=1, keepdims=True)
pairs = np.random.default_rng(cfg.seed).integers(0, n, size=(2, n))
print(f"for scale: the cosine similarity of two random galaxies has median "
      f"{np.median(np.sum(unit[pairs[0]] * unit[pairs[1]], axis=1)):.4f}")
Table(headers + (f"query {redshift_name}", "median |Δz| of its neighbours"), tuple(rows), prov,
      caption=f"The queries of Figure 7 ({here})", digits=3)

# %% [markdown]
# ## Do neighbours share morphology and redshift?
#
# Figure 7 shows neighbours that look alike; whether they *are* alike can be counted. For a
# random sample of query galaxies, each query's `representations.neighbours` nearest galaxies
# are found among all the others in three ways, and compared with the query:
#
# - **representations**: exact cosine search of the representations (the paper's search);
# - **pixels**: exact search of the flattened 5×64×64 centre crops, by cosine similarity and by
#   euclidean distance (the metric of the pixel UMAP), what an unsupervised search without a
#   learned representation finds;
# - **random pairs**: the same number of galaxies drawn at random, the chance level.
#
# The query sample is as large as the sample the paper fitted its pixel UMAP on, a random
# `representations.umap_fit_fraction` of the galaxies (5%, at least `umap_min_fit`), drawn with
# the run's seed: the pixel search reads every image and costs queries × galaxies × 20,480
# multiply-adds, done in chunks of galaxies.
#
# Compared per (query, neighbour) pair: the true morphology class (mock only), the GZ2 majority
# answer to the first question (smooth or features/disk; pairs where both galaxies have at least
# `data.gz2_min_votes` votes), the redshift (mock: the generator's true redshift; real files:
# spec-z where both have one) and the Petrosian r magnitude (where the catalogue has it).

# %%
n_queries = min(n, max(rcfg.umap_min_fit, math.ceil(rcfg.umap_fit_fraction * n)))
rng = np.random.default_rng(cfg.seed)
sample = np.sort(rng.choice(n, size=n_queries, replace=False))
exact = SimilarityIndex(reps, kind="flat")
ssl = exact.search(sample, k).indices  # (Q, k) rows of the survey, the query excluded


def pixel_neighbours(rows, k, chunk):
    """Exact k nearest neighbours of survey rows `rows` among all galaxies in pixel space, by cosine
    similarity and by euclidean distance of the flattened centre crops, the query itself excluded.
    Reads the galaxies `chunk` at a time. Returns {"cosine": (Q, k), "euclidean": (Q, k)} rows."""
    q = pixel_vectors(survey.subset(rows), crop_size=crop)  # (Q, 5*crop*crop) float32
    q_sq = np.einsum("ij,ij->i", q, q, dtype=np.float64)
    best = {m: (np.full((len(rows), k), -np.inf), np.full((len(rows), k), -1)) for m in ("cosine", "euclidean")}
    for start in range(0, n, chunk):
        base = np.arange(start, min(n, start + chunk))
        p = pixel_vectors(survey.subset(base), crop_size=crop)  # (b, 5*crop*crop)
        p_sq = np.einsum("ij,ij->i", p, p, dtype=np.float64)
        dots = (q @ p.T).astype(np.float64)  # (Q, b)
        score = {"cosine": dots / np.sqrt(np.maximum(np.outer(q_sq, p_sq), 1e-300)),
                 "euclidean": -(q_sq[:, None] + p_sq[None, :] - 2 * dots)}  # higher is nearer for both
        itself = rows[:, None] == base[None, :]
        for m, s in score.items():
            s[itself] = -np.inf
            cand_s = np.concatenate([best[m][0], s], axis=1)
            cand_i = np.concatenate([best[m][1], np.broadcast_to(base, s.shape)], axis=1)
            top = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
            best[m] = (np.take_along_axis(cand_s, top, axis=1), np.take_along_axis(cand_i, top, axis=1))
    return {m: idx for m, (_, idx) in best.items()}


pixel = pixel_neighbours(sample, k, chunk=2048)  # galaxies read at a time: speed and memory only
others = rng.integers(0, n - 1, size=(n_queries, k))
chance = others + (others >= sample[:, None])  # k random galaxies other than the query

# %%
smooth_p = None
if has_column(f"gz2/{TREE[0].name}/votes"):
    votes = survey.column(f"gz2/{TREE[0].name}/votes")
    smooth_p = TREE[0].binary_fraction(votes)
    smooth_p[~gz2_min_votes(votes, TREE[0].name, min_votes=cfg.data.gz2_min_votes)] = np.nan
r_mag = survey.column("catalog/petro_mag")[:, R_BAND].astype(np.float64) if has_column("catalog/petro_mag") else None


def agreement(nb, queries):
    """How alike each query and its neighbours are: per (query, neighbour) pair statistics."""
    out = {}
    q = queries[:, None]
    if morphology is not None:
        out["same true morphology (mock)"] = float(np.mean(morphology[nb] == morphology[q]))
    if smooth_p is not None:
        both = np.isfinite(smooth_p[nb]) & np.isfinite(smooth_p[q])
        same = (smooth_p[nb] > 0.5) == (smooth_p[q] > 0.5)
        out["same GZ2 majority answer (smooth vs features)"] = float(same[both].mean()) if both.any() else None
        out["pairs with GZ2 labels on both"] = int(both.sum())
    dz = np.abs(redshift[nb] - redshift[q])
    out[f"median |Δz|, {redshift_name}"] = float(np.nanmedian(dz)) if np.isfinite(dz).any() else None
    if r_mag is not None:
        out["median |Δr| (Petrosian mag)"] = float(np.median(np.abs(r_mag[nb] - r_mag[q])))
    return out


searches = {"representations (cosine)": ssl, "pixels (cosine)": pixel["cosine"],
            "pixels (euclidean)": pixel["euclidean"], "random pairs (chance)": chance}
neighbour_stats = {name: agreement(nb, sample) for name, nb in searches.items()}
quantities = list(neighbour_stats["random pairs (chance)"])
Table(("per (query, neighbour) pair", *searches),
      tuple((qty, *(neighbour_stats[s][qty] for s in searches)) for qty in quantities), prov,
      caption=f"Neighbours of {n_queries:,} random query galaxies among all {n:,} ({k} each; {here})", digits=3)

# %%
lines = []
if morphology is not None:
    same = {s: neighbour_stats[s]["same true morphology (mock)"] for s in searches}
    lines.append(f"the representation neighbours share the query's true morphology in "
                 f"{same['representations (cosine)']:.0%} of pairs, against "
                 f"{max(same['pixels (cosine)'], same['pixels (euclidean)']):.0%} for the better pixel search "
                 f"and {same['random pairs (chance)']:.0%} for random pairs")
dz_key = f"median |Δz|, {redshift_name}"
if neighbour_stats["random pairs (chance)"][dz_key] is not None:
    lines.append(f"their median redshift difference is {neighbour_stats['representations (cosine)'][dz_key]:.3f}, "
                 f"against {min(neighbour_stats['pixels (cosine)'][dz_key], neighbour_stats['pixels (euclidean)'][dz_key]):.3f} "
                 f"(pixels) and {neighbour_stats['random pairs (chance)'][dz_key]:.3f} (random)")
if r_mag is not None:
    dr = {s: neighbour_stats[s]["median |Δr| (Petrosian mag)"] for s in searches}
    lines.append(f"and in brightness the neighbours differ by a median {dr['representations (cosine)']:.2f} mag "
                 f"(representations), {dr['pixels (cosine)']:.2f} and {dr['pixels (euclidean)']:.2f} mag (pixels, "
                 f"cosine and euclidean) and {dr['random pairs (chance)']:.2f} mag (random)")
Markdown(f"On this run ({here}), " + "; ".join(lines) + ".")

# %% [markdown]
# ## Approximate search
#
# An exact search of N queries over N galaxies costs $N^2 D$: for the paper's 1.3 million
# 2048-d vectors, an all-pairs search (such as the anomaly score below) is out of reach without
# an approximate index. `sdsscl.search.SimilarityIndex` also builds faiss's IVF (k-means cells,
# `representations.ivf_nlist`, of which `ivf_nprobe` are visited per query) and HNSW (a graph
# with `hnsw_m` links per node) indexes. Their recall@k is the fraction of each query's exact
# k nearest neighbours they return, for the same random queries as above. (The HNSW graph is
# built on one thread, so that its recall is the same on every run; search speed is measured by
# `benchmarks/bench_search.py`, not here.)

# %%
exact_rows = exact.search(sample, k).indices
ivf = SimilarityIndex(reps, kind="ivf", nlist=rcfg.ivf_nlist, nprobe=rcfg.ivf_nprobe, seed=cfg.seed)
hnsw = SimilarityIndex(reps, kind="hnsw", hnsw_m=rcfg.hnsw_m, seed=cfg.seed, threads=1)
set_faiss_threads()  # back to all cores for what follows
recall = {"ivf": recall_at_k(ivf.search(sample, k).indices, exact_rows),
          "hnsw": recall_at_k(hnsw.search(sample, k).indices, exact_rows)}
Table(("index", "settings (profile)", f"recall@{k}"), (
    ("flat (exact)", "brute force", 1.0),
    ("ivf", f"{ivf.index.nlist} cells, {ivf.index.nprobe} probed", recall["ivf"]),
    ("hnsw", f"M = {rcfg.hnsw_m}, efSearch = {hnsw.index.hnsw.efSearch}", recall["hnsw"]),
), prov, caption=f"Approximate search against exact search, {n_queries:,} queries among {n:,} galaxies ({here})",
    digits=4)

# %% [markdown]
# ## Anomalies: the most isolated galaxies
#
# A galaxy far from all others in the representation space is unlike the rest of the survey:
# an artefact, a rare object or a rare view. `sdsscl.search.anomaly_scores` gives every galaxy
# the cosine distance to its `representations.anomaly_k`-th nearest other galaxy, with the
# profile's index. The highest-scoring galaxies follow, with their score (and on the mock the
# contaminant the generator put in the cutout, if any).

# %%
index = index_from_config(reps, rcfg, crop_size=crop, seed=cfg.seed)
scores = anomaly_scores(index, rcfg.anomaly_k)
order = np.argsort(-scores, kind="stable")
contaminant = survey.column("truth/contaminant").astype(np.int64) if is_mock else None
contaminant_names = names_of("truth/contaminant") if is_mock else None
print(f"anomaly score (distance to the {rcfg.anomaly_k}th neighbour): median {np.median(scores):.4f}, "
      f"99th percentile {np.percentile(scores, 99):.4f}, highest {scores[order[0]]:.4f}")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "The highest anomaly scores of this run (cosine distance to the k-th nearest galaxy in representation space), most isolated first; on the mock the title names the contaminant the generator put in the cutout. The paper shows no anomaly ranking. Made by notebook 07-similarity-search.", "name": "fig-anomalies"}}
top = order[: min(n, 16)]
titles = [f"{scores[i]:.3f}" + (f" {contaminant_names[contaminant[i]]}" if is_mock else "") for i in top]
fig = show_galaxies(torch.stack([survey[int(i)]["image"] for i in top]).numpy(), titles=titles, ncols=8,
                    crop_box=crop, panel_size=1.3)
save_figure(fig, "anomalies", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# On the mock the generator records which galaxies it gave a contaminant (`truth/contaminant`:
# a neighbouring galaxy, a star, a satellite trail or a bad CCD column in the cutout), so the
# ranking can be scored: the ROC AUC of the score for contaminated against clean galaxies (0.5:
# no better than chance; 1: every contaminated galaxy scores above every clean one), and the
# share of each kind among the top 1% and 5% of scores against its share of the whole survey.
# The authors' files record no such truth, and there the section is skipped. (A satellite trail
# or a bad column lies in one band, which may be u or z and then does not show in the *gri*
# composites above, and may lie outside the 64×64 crop the network sees.)

# %%
anomaly = {"k": rcfg.anomaly_k, "median": float(np.median(scores)), "max": float(scores[order[0]]),
           "top_objids": survey.objids[top]}
if is_mock:
    clean = contaminant == 0
    tops = {share: order[: max(1, round(share * n))] for share in (0.01, 0.05)}
    rows, per_type = [], {}
    for code, name in enumerate(contaminant_names):  # code 0 ("none"): every contaminated galaxy
        members = contaminant == code if code else ~clean
        label = name if code else "any contaminant"
        scored = members | clean  # this kind against the clean galaxies
        auc = roc_auc_score(members[scored], scores[scored]) if members.any() and clean.any() else None
        fractions = {share: float(members[t].mean()) for share, t in tops.items()}
        per_type[label] = {"n": int(members.sum()), "base_rate": float(members.mean()), "auc": auc,
                           "top_1pct": fractions[0.01], "top_5pct": fractions[0.05]}
        rows.append((label, int(members.sum()), float(members.mean()), fractions[0.01], fractions[0.05], auc))
    anomaly["contaminants"] = per_type
    display(Table(("galaxies generated with", "galaxies", "share of all", "share of top 1%", "share of top 5%",
                   "ROC AUC against clean"), tuple(rows), prov,
                  caption=f"How well the anomaly score finds the mock's contaminated galaxies ({here})", digits=3))
    if r_mag is not None:
        display(Table(("galaxies", "median Petrosian r (mag)"), (
            ("all", float(np.median(r_mag))), ("top 1% of scores", float(np.median(r_mag[tops[0.01]]))),
            ("top 5% of scores", float(np.median(r_mag[tops[0.05]]))),
        ), prov, caption="What else the score follows: brightness", digits=3))
else:
    print("Real files carry no record of contaminants: the ranking is shown but not scored.")

# %%
if is_mock:
    any_c = anomaly["contaminants"]["any contaminant"]
    lift = any_c["top_1pct"] / any_c["base_rate"] if any_c["base_rate"] > 0 else float("nan")
    best = max((v["auc"], t) for t, v in anomaly["contaminants"].items() if t != "any contaminant" and v["auc"] is not None)
    worst = min((v["auc"], t) for t, v in anomaly["contaminants"].items() if t != "any contaminant" and v["auc"] is not None)
    top_says = ("the top of the ranking is dominated by contaminated galaxies" if any_c["top_1pct"] >= 0.5 else
                "contaminated galaxies are over-represented at the top of the ranking" if lift >= 2 else
                "the top of the ranking is hardly enriched in contaminated galaxies")
    auc_says = "separates contaminated from clean galaxies " + (
        "well" if any_c["auc"] >= 0.9 else
        "only moderately: many contaminated galaxies are not isolated at all" if any_c["auc"] >= 0.7 else
        "weakly" if any_c["auc"] >= 0.6 else "barely better than chance")
    display(Markdown(
        f"On this run ({here}), {any_c['base_rate']:.1%} of the galaxies carry a contaminant; "
        f"{any_c['top_1pct']:.1%} of the top 1% of anomaly scores do ({lift:.1f} times the base rate) and "
        f"{any_c['top_5pct']:.1%} of the top 5%: {top_says}. Over all galaxies the score {auc_says} "
        f"(ROC AUC {any_c['auc']:.2f}; by kind from {worst[0]:.2f} for {worst[1]} to {best[0]:.2f} for {best[1]}). "
        f"The ranking is a list to inspect from the top, not a detector of every artefact."))

# %% [markdown]
# ## The numbers this chapter writes
#
# `runs/<profile>/metrics/similarity_search.json` holds the neighbour statistics, the recalls
# and the anomaly scores' summary, with their provenance.

# %%
metrics = {"n_galaxies": n, "neighbours": k, "n_queries": n_queries, "example_objids": survey.objids[queries],
           "example_similarities": result.similarity, "neighbour_agreement": neighbour_stats,
           "recall_at_k": recall, "search_index": rcfg.search_index, "anomaly": anomaly}
record = write_metrics("similarity_search", metrics, paths, prov)
print(f"wrote {record.relative_to(paths.root.parent)}")

# %% [markdown]
# ## What the paper reports (paper)
#
# {cite:t}`hayat2021`, on 1.3 million real SDSS galaxies with a ResNet50 (2048-d), quoted, not
# computed here:
#
# - Ranking all galaxies by the cosine similarity of their representations to a query's
#   returns galaxies that "visually appear extremely similar, and are seemingly agnostic to
#   rotations and jitter" (Appendix B.1, Figure 7: ten queries, five neighbours each).
# - Under rotation, jitter and added noise, the same ten galaxies move across a UMAP of the
#   pixels but stay nearly still in a UMAP of the representations (Appendix B.2, Figure 9;
#   reproduced in {doc}`04-representation-space`).
#
# The paper gives no number for the search: no neighbour agreement, no recall, no anomaly
# ranking. The tables above are this project's measurements, for this run; on the mock they
# score a small encoder trained for minutes on 2 CPU cores ({doc}`03-moco`), not the paper's.
#
# ## Reproduce
#
# The figure from the command line, for any galaxies (by position in the survey or by ObjID),
# with the profile's index or another one:
#
# ```bash
# .venv/bin/python scripts/similar.py --profile default --index 0 17 256
# .venv/bin/python scripts/similar.py --profile default --objid 1237700000000000389 --k 8
# .venv/bin/python scripts/similar.py --profile default --index 0 17 --set representations.search_index=hnsw
# .venv/bin/python scripts/build_book.py run --profile default --only 07-similarity-search
# ```
#
# The command for this chapter's Figure 7:

# %%
print(f".venv/bin/python scripts/similar.py --profile {profile} --index {' '.join(str(int(i)) for i in queries)}")

# %% [markdown]
# ## Summary
#
# The paper's similarity search runs on this run's representations, exact and approximate; its
# neighbours are compared, in numbers, with pixel-space neighbours and with chance; and the
# same index ranks galaxies by isolation, scored on the mock against the generator's record of
# contaminated cutouts.
#
# **What next.** {doc}`08-ablation`: which augmentations make the best representations.
