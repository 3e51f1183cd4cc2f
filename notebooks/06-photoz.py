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
# # Photometric redshifts
#
# **Overview.** Following {cite:t}`pasquet2019`, the paper predicts redshifts with a
# classifier over 180 bins on $0 \le z \le 0.4$; the estimate $z_p$ is the expectation
# $\mathbb{E}(z)$ over the predicted probabilities (Section 3.3, Appendix E.2). Images are
# de-reddened with the tabulated $E(B-V)$, rotated and jitter-cropped in training, and
# centre-cropped at test. A **supervised** network of the encoder's architecture trained
# from scratch is compared with the **fine-tuned** pretrained encoder (pretrained weights
# at a 10x smaller learning rate than the new head) at growing fractions of the training
# labels, with
#
# - $\Delta z = (z_p - z_s)/(1 + z_s)$, the bias $\langle \Delta z \rangle$,
# - $\sigma_\mathrm{MAD} = 1.4826\,\mathrm{median}(|\Delta z - \mathrm{median}(\Delta z)|)$,
# - $\eta$, the fraction of outliers with $|\Delta z| > 0.05$.
#
# Beyond the paper, the whole $p(z)$ is kept: its calibration is shown by the probability
# integral transform (PIT) and scored by the continuous ranked probability score (CRPS);
# and a **photometry-only** reference (nearest neighbours on catalogue magnitude and colours)
# tells how much the images add.
#
# **Prerequisites.** {doc}`03-moco` (the pretrained encoder) and {doc}`01-data` (the splits).

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"photoz.fractions": [0.1, 1.0]}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
# %matplotlib inline
import time

from matplotlib.figure import Figure

from sdsscl.config import load_profile
from sdsscl.downstream import RunStore, aggregate, describe_schedule, kept_start, run_photoz
from sdsscl.metrics import label_efficiency, pit_histogram
from sdsscl.plotting import MODEL_LABELS, label_curves, photoz_scatter
from sdsscl.provenance import Provenance, Table, run_paths, save_figure, write_metrics

cfg = load_profile(profile, overrides)
paper = load_profile("paper")
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
pc = cfg.photoz
data_label = "mock" if cfg.data.source == "mock" else "real SDSS"

# %% [markdown]
# ## The settings: paper and this run

# %%
rows = [("redshift bins", f"{pc.bins} on [0, {pc.z_max:g}]", f"{paper.photoz.bins} on [0, {paper.photoz.z_max:g}]"),
        ("training fractions", ", ".join(f"{f:g}" for f in pc.fractions), "0.1 ... 1.0 (Figure 4)"),
        ("supervised", describe_schedule(pc.supervised), "not stated beyond 100 epochs, batch 256"),
        ("fine-tuned", describe_schedule(pc.finetune), "lr 1e-4 encoder, 1e-3 head, 100 epochs, batch 256")]
Table(("setting", f"this run ({data_label})", "paper (Appendix E.2)"), tuple(rows), prov,
      caption="Photo-z settings")

# %% [markdown]
# ## The sweep

# %%
t0 = time.perf_counter()
summary = run_photoz(cfg, runs_dir, progress=False)
print(f"{len(summary['runs'])} networks; this execution took {time.perf_counter() - t0:.0f} s")
print(f"labelled galaxies: {summary['n_train']} train, {summary['n_val']} validation, {summary['n_test']} test; "
      f"{summary['n_clipped']} spec-z above {summary['z_max']:g} clipped into the last bin")
records = summary["runs"]
reference = summary["photometry_reference"]
print(kept_start(records))

# %%
stats = {m: aggregate(records + reference, ("model", "fraction"), m) for m in ("bias", "sigma_mad", "eta")}
crps = aggregate(records, ("model", "fraction"), "crps")
counts = {(r["model"], r["fraction"]): r["count"] for r in records + reference}
rows = []
for key in sorted(stats["sigma_mad"], key=lambda k: (k[1], ["photometry", "supervised", "finetune"].index(k[0]))):
    model, fraction = key
    rows.append((fraction, counts[key], MODEL_LABELS[model], stats["bias"][key]["mean"],
                 stats["sigma_mad"][key]["mean"], 100 * stats["eta"][key]["mean"],
                 crps[key]["mean"] if key in crps else None))
Table(("fraction", "labels", "model", "<Δz>", "σ_MAD", "η (%)", "CRPS"), tuple(rows), prov,
      caption=f"Photo-z on the test set ({data_label})", digits=3)

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Bias, sigma_MAD and outlier percentage of the photo-z estimates on the test set against the fraction of training labels, for the supervised network, the fine-tuned encoder and the photometry-only reference. Reproduces paper Figure 4 on this run's data. Made by notebook 06-photoz.", "name": "fig-photoz-sweep"}}
fig = Figure(figsize=(9, 2.6), layout="constrained")
axes = fig.subplots(1, 3)
for ax, (metric, label, scale) in zip(axes, (("bias", "<Δz>", 1), ("sigma_mad", "σ_MAD", 1), ("eta", "η (%)", 100))):
    series = {}
    for model in ("supervised", "finetune", "photometry"):
        keys = sorted(k for k in stats[metric] if k[0] == model)
        series[model] = ([k[1] for k in keys], [scale * stats[metric][k]["mean"] for k in keys],
                         [scale * stats[metric][k]["std"] for k in keys])
    label_curves(series, label, ax=ax, xlabel="fraction of training labels", logx=False)
axes[0].axhline(0, color="0.6", lw=0.7)
axes[1].legend(fontsize=6, frameon=False)
save_figure(fig, "photoz_sweep", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ## The best models (Figure 5)
#
# Photometric against spectroscopic redshift on the test set, for the fine-tuned and the
# supervised network trained on the most labels.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Photometric against spectroscopic redshift on the test set for the fine-tuned encoder (left) and the supervised network (right) trained on the largest fraction of labels, with sigma_MAD, bias and outlier percentage. Reproduces paper Figure 5 on this run's data. Made by notebook 06-photoz.", "name": "fig-photoz-scatter"}}
store = RunStore(paths.downstream / "photoz", {})
top = max(pc.fractions)
best = {}
for model in ("finetune", "supervised"):
    rec = next(r for r in records if r["model"] == model and r["fraction"] == top and r["seed"] == 0)
    best[model] = (store.arrays(f"{model}/f{top:g}-s0"), rec)
fig = photoz_scatter({MODEL_LABELS[m]: (a["z_spec"], a["z_phot"], r["metrics"]) for m, (a, r) in best.items()},
                     z_max=pc.z_max)
save_figure(fig, "photoz_scatter", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ## Calibration of p(z)
#
# If the predicted $p(z)$ is calibrated, the PIT (the predicted CDF at the true redshift)
# is uniform: a U shape means over-confident distributions, a hump under-confident ones, a
# slope a bias. The CRPS (in redshift units, lower is better) scores the whole distribution.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "PIT histograms of the test set for the fine-tuned and supervised networks trained on the most labels; a calibrated p(z) gives the flat dashed line. The paper has no such figure (it keeps only the point estimate). Made by notebook 06-photoz.", "name": "fig-photoz-pit"}}
fig = Figure(figsize=(6, 2.3), layout="constrained")
axes = fig.subplots(1, 2, sharey=True)
for ax, (model, (arrays, rec)) in zip(axes, best.items()):
    counts_pit, edges = pit_histogram(arrays["pit"], n_bins=20, density=True)
    ax.stairs(counts_pit, edges, fill=True, alpha=0.6, color="C2" if model == "finetune" else "C3")
    ax.axhline(1, color="k", ls="--", lw=0.8)
    ax.set_title(f"{MODEL_LABELS[model]} (CRPS {rec['metrics']['crps']:.4f})", fontsize=8)
    ax.set_xlabel("PIT", fontsize=7)
axes[0].set_ylabel("density", fontsize=7)
save_figure(fig, "photoz_pit", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ## Label efficiency and the paper's claims
#
# How many times more labels the supervised network needs to reach the fine-tuned
# encoder's $\sigma_\mathrm{MAD}$ (interpolated in $\log n$ on the supervised curve made
# monotone by its running best; "≥ x": never reached within the fractions measured). The
# paper reports 2–4x (Section 3.3).

# %%
sup = sorted((counts[k], v["mean"]) for k, v in stats["sigma_mad"].items() if k[0] == "supervised")
rows, efficiency, claims = [], {}, []
for key, v in sorted(stats["sigma_mad"].items()):
    model, fraction = key
    if model != "finetune":
        continue
    eff = label_efficiency([c for c, _ in sup], [m for _, m in sup], counts[key], v["mean"], higher_is_better=False)
    rows.append((fraction, counts[key], str(eff)))
    efficiency[f"{fraction:g}"] = {"factor": eff.factor, "bound": eff.bound, "lower_bound": eff.lower_bound,
                                   "upper_bound": eff.upper_bound}
    ref = stats["sigma_mad"].get(("photometry", fraction))
    claims.append((fraction, v["mean"] < stats["sigma_mad"][("supervised", fraction)]["mean"],
                   ref is not None and v["mean"] < ref["mean"]))
Table(("fraction", "labels", "supervised needs x more labels"), tuple(rows), prov,
      caption=f"Label efficiency of the fine-tuned encoder from test σ_MAD ({data_label})")

# %%
Table(("fraction", "fine-tuned σ_MAD below supervised", "fine-tuned σ_MAD below photometry only"), tuple(claims),
      prov, caption=f"The paper's claim, and the images against photometry, on this run ({data_label})")

# %%
record = write_metrics("photoz_summary", {
    **{m: {f"{k[0]}/{k[1]:g}": v for k, v in stats[m].items()} for m in stats},
    "crps": {f"{k[0]}/{k[1]:g}": v for k, v in crps.items()},
    "label_efficiency": efficiency,
    "claims": {f"{f:g}": {"beats_supervised": a, "beats_photometry": b} for f, a, b in claims},
    "n_clipped": summary["n_clipped"]}, paths, prov)

# %% [markdown]
# ## What the paper reports (paper)
#
# On 400,000 real SDSS training galaxies (Section 3.3, Appendix E.2): the supervised
# baseline matches {cite:t}`pasquet2019` in $\sigma_\mathrm{MAD}$ and $\eta$ with a
# negligible bias; at every fraction of training data the fine-tuned representations have a
# lower $\sigma_\mathrm{MAD}$ and $\eta$ than the supervised network, worth 2–4 times more
# spec-z labels, and the fine-tuned model on the full training set sets a new state of the
# art for CNN photo-z on SDSS (Figures 4, 5). The paper prints these results as figures, not
# numbers.
#
# ## What this run shows
#
# The tables above are this run's; read them for the numbers. On two CPU cores each network
# trains for a fixed small number of steps (the paper: 100 epochs), so both networks are far
# from converged and the absolute $\sigma_\mathrm{MAD}$ is much larger than the paper's; the
# comparison between them at equal cost is what this chapter tests. The fine-tuned head
# starts from the linear probe (`head_init: probe`, a departure from the paper explained in
# `profiles/default.yaml`); where validation kept step 0 (the line printed after the sweep),
# the fine-tuned row is the linear probe itself. The photometry-only reference uses the
# catalogue's de-reddened Petrosian $r$ and model colours, which the image networks never see
# (on the mock those catalogue fluxes are measured: each carries Gaussian noise of its
# catalogued error, from the S/N of the galaxy's image).
#
# ## Is it the fine-tuning recipe? A study at larger budgets (not rerun by this build)
#
# Whether a longer run or another recipe would let the pretrained encoder win was measured
# apart from this build, with `benchmarks/photoz_recipes.py`, on the default profile's mock,
# splits and pretrained encoder, on one NVIDIA H100 (the mock regenerated there from the same
# seed, with mock generator 1.0; version 1.1 changed only the catalogue photometry, not the
# images). It trains the networks exactly as this chapter does, with every network given the
# same number of steps. Test $\sigma_\mathrm{MAD}$ (mean of seeds 0 and 1 at 400 steps; seed
# 0 alone at 200 and 800; "–": not finished in the time available):
#
# | steps | fraction | supervised | paper's fine-tuning (random head, encoder lr ×0.1) | random head, encoder at the head's lr |
# |---:|---:|---:|---:|---:|
# | 200 | 0.1 | 0.0201 | 0.0335 | 0.0198 |
# | 200 | 0.3 | 0.0201 | 0.0330 | 0.0206 |
# | 200 | 1.0 | 0.0209 | 0.0333 | 0.0207 |
# | 400 | 0.1 | 0.0189 | 0.0301 | 0.0198 |
# | 400 | 0.3 | 0.0185 | 0.0255 | 0.0190 |
# | 400 | 1.0 | 0.0187 | 0.0258 | 0.0190 |
# | 800 | 0.1 | 0.0204 | 0.0246 | 0.0213 |
# | 800 | 0.3 | 0.0192 | 0.0207 | 0.0197 |
# | 800 | 1.0 | 0.0180 | – | – |
#
# ```bash
# python3 benchmarks/photoz_recipes.py --device cuda --steps 400 --seeds 0 1 \
#     --recipes supervised random-ft random-ft-x1
# ```
#
# With the paper's learning rates the pretrained start is *worse* than a random
# initialisation at every fraction and budget measured; with the encoder at the head's rate it
# is level with the supervised network, within the seed-to-seed spread (up to 0.0009). Two
# encoders pretrained on the H100 with this profile's settings, one with the paper's best set
# of augmentations and one without reddening (the augmentation that removes colour, the main
# redshift signal, from the representation), fine-tuned the same way for 400 steps, gave the
# paper's recipe 0.0293 / 0.0247 / 0.0256 and 0.0275 / 0.0252 / 0.0248 at fractions 0.1 / 0.3
# / 1.0: leaving reddening out does not change the picture. So on the mock, at this
# encoder's size and pretraining length, **the pretraining carries no photo-z advantage**,
# whatever the recipe or budget; the paper's photo-z claim is neither confirmed nor refuted
# here, and testing it needs the paper's scale of pretraining (the `paper` profile).
#
# ## Reproduce
#
# ```bash
# .venv/bin/python scripts/downstream.py photoz --profile default
# torchrun --nproc_per_node=8 scripts/downstream.py photoz --profile paper
# ```
#
# ## Summary
#
# The paper's photo-z set-up runs end to end, with its metrics, the full $p(z)$ and a
# photometry-only reference. **What next.** {doc}`07-similarity-search` and
# {doc}`08-ablation`.
