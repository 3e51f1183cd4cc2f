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
# # Introduction
#
# **Overview.** {cite:t}`hayat2021` train a contrastive self-supervised encoder (MoCo v2,
# {cite:p}`he2020,chenx2020`) on about 1.3 million five-band SDSS galaxy images, then use its
# representations for galaxy morphology, photometric redshifts and similarity search. This
# chapter shows the settings this book was run with and lists what the paper claims, with the
# figures that show it and the chapter of this book that reproduces it.
#
# **Prerequisites.** None: this notebook reads only the profile.
#
# Every notebook starts with the same `parameters` cell: the profile (`profiles/<name>.yaml`),
# overrides of single settings, and where artifacts go. No other cell holds a setting.

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"mock.seed": 7}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
from sdsscl.config import load_profile
from sdsscl.paper import CITATION, CLAIMS
from sdsscl.provenance import Provenance, Table, run_paths, write_metrics

cfg = load_profile(profile, overrides)
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
paper_cfg = load_profile("paper")

# %% [markdown]
# ## The settings of this run
#
# The resolved profile, setting by setting, beside the `paper` profile, which carries the
# paper's values with the section each comes from (`profiles/paper.yaml`). Settings the
# paper does not give (seeds, the mock) are marked there as such.

# %%
paper_flat = paper_cfg.flat()
skip = {"name", "description"}
Table(
    headers=("setting", f"this run ({cfg.run_name})", "paper profile", ""),
    rows=tuple((key, value, paper_flat.get(key), "same" if value == paper_flat.get(key) else "differs")
               for key, value in cfg.flat().items() if key not in skip),
    provenance=prov,
    caption=f"Profile {cfg.run_name}: {cfg.description}",
)

# %% [markdown]
# The same settings are written to `runs/<profile>/metrics/profile.json`, beside every
# other number of this run.

# %%
record = write_metrics("profile", {"config": cfg.to_dict(), "config_hash": cfg.config_hash()}, paths, prov)
print(f"wrote {record.relative_to(paths.root.parent)}")

# %% [markdown]
# ## What the paper claims (paper)
#
# The results of the paper, each with the section that states it and the figures that show
# it. The last column says whether this build reproduces it on the mock yet.

# %%
Table(
    headers=("result", "paper says", "section", "paper figures", "chapter here", "reproduced here?"),
    rows=tuple((c.key, c.statement, c.section, ", ".join(f"Fig. {f}" for f in c.figures), c.chapter,
                "on the mock" if c.chapter.startswith("notebooks/") else "not yet")
               for c in CLAIMS),
    provenance=prov,
    caption=CITATION,
)

# %% [markdown]
# ## Summary
#
# The settings above fix every number in this book: the config hash in each provenance
# line identifies them. The paper's results are quoted from its text; a chapter marked
# *not yet* says so on its own page and shows no numbers of its own.
#
# **What next.** {doc}`01-data` builds the data set: the mock survey beside the real SDSS
# catalogue, and the labelled and unlabelled selection (paper Figure 6).
