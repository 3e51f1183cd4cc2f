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
#     depends: [01-data]
# ---

# %% [markdown]
# # Augmentations
#
# **Overview.** The paper's main methodological choice is the set of augmentations that make
# the two views of a galaxy (Section 2): each models an observational effect the
# representation should ignore. This chapter applies each of them, with the paper's
# settings, to a few galaxies of this run, shows the parameter values drawn, checks two of
# them against what the images show, and shows the query and key views MoCo trains on.
#
# - **Galactic reddening**: $E(B-V) \sim \mathcal{U}(0, 0.5)$, band $b$ dimmed by
#   $10^{-0.4 R_b E(B-V)}$ with the {cite:t}`schlafly2011` coefficients.
# - **PSF**: Gaussian smoothing, $r$-band $\sigma \sim |\mathcal{N}(0, 0.13'')|$, other bands
#   scaled as $\lambda^{-0.3}$ {cite:p}`xin2018`.
# - **Rotation**: angle $\sim \mathcal{U}(0, 2\pi)$, bilinear.
# - **Jitter and crop**: the centre of the $107^2$ image moves by two integers
#   $\sim \mathcal{U}\{-7..7\}$, then a $64^2$ crop.
# - **Gaussian noise**: $\gamma_c = \mathcal{U}(1, 3) \times \mathrm{MAD}_c$ per band.
#
# sdsscl applies them to whole batches as tensor operations on the training device
# (`sdsscl.augment`), in the order reddening → PSF → rotation + jitter-crop (one resampling)
# → noise; the authors applied them one image at a time with numpy and scikit-image.
#
# **Prerequisites.** {doc}`01-data` (the data set and its per-band MAD).

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"augment.max_ebv": 0.3}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import torch

from sdsscl.augment import TwoViews
from sdsscl.config import load_profile
from sdsscl.constants import BANDS, R_SF11
from sdsscl.data import SurveyDataset
from sdsscl.plotting import show_galaxies
from sdsscl.provenance import Provenance, Table, data_files, run_paths, save_figure, training_mad
from sdsscl.train import augmentation_pipeline

cfg = load_profile(profile, overrides)
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
files = data_files(cfg, paths)
survey = SurveyDataset(sorted(set(files["unlabelled"]) | set(files["labelled"])))
here = f"{'mock' if cfg.data.source == 'mock' else 'real files'}, profile {cfg.run_name}"
# the same per-band MAD as the data chapter (cached there)
mad = training_mad(cfg, paths, survey)
aug = cfg.augment
rng = np.random.default_rng(cfg.seed)
plt.rcParams.update({"figure.dpi": cfg.book.dpi, "savefig.dpi": cfg.book.dpi, "font.size": 9})

# a few bright, large galaxies so the effects are visible
r90 = survey.column("catalog/petro_r90") if "catalog/petro_r90" in survey.infos[0].shapes else None
order = np.argsort(-r90) if r90 is not None else rng.permutation(len(survey))
picks = np.sort(rng.choice(order[: max(40, len(order) // 20)], 4, replace=False))
batch = torch.stack([survey[int(i)]["image"] for i in picks])  # (4, 5, 107, 107)
print(f"galaxies shown: ObjID {[int(survey.objids[i]) for i in picks]}")

# %% [markdown]
# ## The settings: paper and this run
#
# The profile's `augment` section holds every setting; the paper's values are those of
# Section 2.

# %%
paper_values = {"max_ebv": 0.5, "psf_sigma_r_arcsec": 0.13, "psf_wavelength_power": -0.3,
                "max_jitter": 7, "crop_size": 64, "noise_scale_min": 1.0, "noise_scale_max": 3.0}
rows = [(k, getattr(aug, k), v) for k, v in paper_values.items()]
rows.append(("enabled", ", ".join(aug.enabled), "all but psf (best, Appendix D)"))
rows += [(f"MAD {b} (nmgy)", float(m), None) for b, m in zip(BANDS, mad)]
Table(("setting", here, "paper (Section 2)"), tuple(rows), prov, caption="Augmentation settings", digits=4)

# %% [markdown]
# ## Each augmentation alone
#
# Each row applies one augmentation (then the plain centre crop, if the augmentation does not
# crop) to the same four galaxies, with the parameters drawn printed under each image.
# The first row is the untouched centre crop.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Each augmentation of Section 2 alone on four galaxies of this run (Lupton gri). The paper shows no example views; its Figure 1 (left) is a schematic of the framework. Made by notebook 02-augmentations.", "name": "fig-augmentations"}}
gen = torch.Generator().manual_seed(cfg.seed)
rows_img, titles, drawn = [], [], {}
plain = augmentation_pipeline(aug, mad, names=())
rows_img.append(plain.apply(batch, plain.sample(len(batch), gen)))
titles += ["centre crop"] * len(batch)
for name in ("reddening", "psf", "rotate", "jitter_crop", "noise"):
    pipe = augmentation_pipeline(aug, mad, names=(name,))
    p = pipe.sample(len(batch), gen)
    rows_img.append(pipe.apply(batch, p))
    sub = getattr(p, name)
    if name == "reddening":
        labels = [f"E(B-V)={v:.2f}" for v in sub.ebv.tolist()]
    elif name == "psf":
        labels = [f"σ_r={v:.2f}\"" for v in sub.sigma_r.tolist()]
    elif name == "rotate":
        labels = [f"{np.degrees(v):.0f}°" for v in sub.angle.tolist()]
    elif name == "jitter_crop":
        labels = [f"shift {tuple(int(s) for s in v)}" for v in sub.shifts.tolist()]
    else:
        labels = [f"{v:.2f}×MAD" for v in sub.level.tolist()]
    titles += [f"{name}: {t}" for t in labels]
    drawn[name] = sub
views = torch.cat(rows_img).numpy()
fig = show_galaxies(views, titles=titles, ncols=len(batch), panel_size=1.5)
save_figure(fig, "augmentations_each", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ## What the images show
#
# Two checks of the drawn values against the images themselves, on these galaxies:
# the reddening row dims each band by exactly $10^{-0.4 R_b E(B-V)}$, and the noise row's
# added noise has, per band, the drawn level times the MAD (measured as the standard deviation
# of the difference from the plain crop).

# %%
plain_crop = rows_img[0].double()
red = rows_img[1].double()
ratio = (red.sum(dim=(2, 3)) / plain_crop.sum(dim=(2, 3))).numpy()  # (4, 5)
ebv_drawn = drawn["reddening"].ebv.double().numpy()
expected = 10 ** (-0.4 * np.outer(ebv_drawn, R_SF11))
noise_added = (rows_img[5].double() - plain_crop).std(dim=(2, 3)).numpy()  # (4, 5)
levels = drawn["noise"].level.double().numpy()
rows = [(f"galaxy {k + 1}", ebv_drawn[k], "yes" if np.allclose(ratio[k], expected[k], rtol=1e-5) else "NO",
         levels[k], float(np.median(noise_added[k] / (levels[k] * mad)))) for k in range(len(batch))]
Table(("galaxy", "E(B-V) drawn", "band fluxes dimmed by 10^(-0.4 R E) (1e-5)", "noise level drawn",
       "median measured / (level × MAD)"), tuple(rows), prov, caption="Drawn parameters against the images", digits=3)

# %% [markdown]
# ## The two views MoCo sees
#
# With the profile's set (`augment.enabled`; the paper's best: all but PSF, Appendix D), each
# galaxy gives a query and a key view with independent draws. These are the pairs the
# contrastive loss pulls together.

# %% tags=["hide-input"] mystnb={"figure": {"caption": "Query (top) and key (bottom) views of four galaxies under the profile's augmentation set; the network sees these 64x64 crops. The paper shows no example views. Made by notebook 02-augmentations.", "name": "fig-two-views"}}
two = TwoViews(augmentation_pipeline(aug, mad))
q, k = two(batch, torch.Generator().manual_seed(cfg.seed + 1))
fig = show_galaxies(torch.cat([q, k]).numpy(), titles=[f"query {i + 1}" for i in range(len(batch))]
                    + [f"key {i + 1}" for i in range(len(batch))], ncols=len(batch), panel_size=1.5)
save_figure(fig, "two_views", paths, prov, cfg.book.dpi)
display(fig)

# %% [markdown]
# ## Speed
#
# The batched augmentations are measured against a per-image numpy/scikit-image pipeline in
# the authors' style by `benchmarks/bench_augment.py` (figures and machine in the issue notes
# and {doc}`/book/reproduce`); timings are not computed in the book, whose numbers must not
# depend on the machine.
#
# ## Summary
#
# The five augmentations act as the paper describes, on whole batches, and the drawn values
# are what the images show. Which of them make the best representations is the ablation of
# {doc}`/notebooks/08-ablation`.
#
# **What next.** {doc}`03-moco`: the contrastive pretraining that uses these views.
