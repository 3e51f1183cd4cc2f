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
# # Contrastive pretraining (MoCo v2)
#
# **Overview.** The paper pretrains its encoder with MoCo v2 {cite:p}`he2020,chenx2020`
# (Section 2, Appendix E.1): two augmented views of each galaxy pass through a query encoder
# and a momentum-averaged key encoder; the InfoNCE loss (paper Eq. 1) pulls the pair together
# and pushes the query away from a queue of keys of other galaxies. The authors never released
# this code; `sdsscl.moco` and `sdsscl.train` are a from-scratch implementation:
#
# - encoder: torchvision ResNet with a 5-band, stride-1 `conv1` (7×7, padding 3), no max-pool,
#   the average-pool output as the representation (2048-d for ResNet50), and a two-layer MLP
#   head to 128-d for the loss;
# - key encoder $\theta_k \leftarrow m\,\theta_k + (1-m)\,\theta_q$ (Eq. E1), no gradients;
#   a queue of $K$ normalised keys gathered from every process; temperature $\tau$;
# - shuffle-BN across processes (He et al. 2020), or on one process the key batch encoded in
#   shuffled groups, so BatchNorm cannot pair a key with its query;
# - SGD with a cosine schedule, the learning rate scaled linearly with the global batch;
#   augmentations applied to whole batches on the training device ({doc}`02-augmentations`);
# - `torchrun` for many GPUs and nodes (NCCL) or CPU processes (gloo); atomic checkpoints in
#   the authors' published layout with exact resume.
#
# This chapter runs the profile's pretraining (or continues it, if it was interrupted),
# shows its loss and contrastive accuracy, and sets its settings beside the paper's.
#
# **Prerequisites.** {doc}`01-data` (the data set and the noise scale).

# %% tags=["parameters"]
profile = "default"  # profiles/<profile>.yaml: smoke, default or paper
overrides = {}  # dotted-key overrides, e.g. {"pretrain.epochs": 10}
runs_dir = None  # artifact root; None means runs/ in the project

# %%
# %matplotlib inline
import csv
import time

import matplotlib.pyplot as plt
import numpy as np

from sdsscl.checkpoint import load_encoder
from sdsscl.config import load_profile
from sdsscl.models import representation_dim
from sdsscl.provenance import Provenance, Table, run_paths, save_figure, write_metrics
from sdsscl.train import run_pretraining

cfg = load_profile(profile, overrides)
paper = load_profile("paper")
paths = run_paths(cfg, runs_dir)
prov = Provenance.of(cfg)
here = f"{'mock' if cfg.data.source == 'mock' else 'real files'}, profile {cfg.run_name}"
plt.rcParams.update({"figure.dpi": cfg.book.dpi, "savefig.dpi": cfg.book.dpi, "font.size": 9})

# %% [markdown]
# ## The settings: paper and this run
#
# The paper's column is the `paper` profile, whose every value cites its source
# (`profiles/paper.yaml`). The CPU profiles shrink the network and the schedule so that
# pretraining fits on two cores; the comments in `profiles/default.yaml` say why each differs.

# %%
p, q = cfg.pretrain, paper.pretrain
rows = [
    ("encoder", f"{p.encoder.arch}, width {p.encoder.width}, stem stride {p.encoder.stem_stride}",
     f"{q.encoder.arch}, width {q.encoder.width}, stem stride {q.encoder.stem_stride}"),
    ("representation dimension", representation_dim(p.encoder), representation_dim(q.encoder)),
    ("projection head output", p.encoder.projection_dim, q.encoder.projection_dim),
    ("epochs", p.epochs, q.epochs),
    ("global batch (1 process here; 8 GPUs in the paper)", p.batch_size, q.batch_size * 8),
    ("learning rate per 256 images (cosine)", p.base_lr, q.base_lr),
    ("SGD momentum, weight decay", f"{p.momentum}, {p.weight_decay}", f"{q.momentum}, {q.weight_decay}"),
    ("queue size K", p.queue_size, q.queue_size),
    ("key momentum m", p.key_momentum, q.key_momentum),
    ("temperature tau", p.temperature, q.temperature),
    ("augmentations", ", ".join(cfg.augment.enabled), ", ".join(paper.augment.enabled)),
]
Table(("setting", here, "paper (Section 2, Appendix E.1)"), tuple(rows), prov,
      caption="Pretraining settings", digits=4)

# %% [markdown]
# ## Pretraining
#
# The run writes `runs/<profile>/checkpoints/moco/` (checkpoint, `log.csv`, TensorBoard).
# If a checkpoint of the same settings and data is there, the run continues from it, so
# re-executing this notebook after an interruption loses nothing, and a finished run is not
# repeated. "The same data" is checked on the content: the ObjIDs, 64 of the images and the
# per-band MAD that scales the noise, so a mock regenerated with other images trains afresh.

# %%
t0 = time.perf_counter()
ckpt = run_pretraining(cfg, runs_dir, resume="auto", progress=False)
wall = time.perf_counter() - t0
out = ckpt.parent
with open(out / "log.csv", newline="") as fh:
    log = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
step = np.array([r["step"] for r in log])
loss = np.array([r["loss"] for r in log])
top1 = np.array([r["top1"] for r in log])
lr = np.array([r["lr"] for r in log])
rate = np.array([r["images_per_s"] for r in log])
print(f"{int(step[-1])} steps logged; this execution took {wall:.0f} s")
print(f"median throughput: {np.median(rate[1:] if len(rate) > 1 else rate):,.0f} images/s")

# %% tags=["hide-input"] mystnb={"figure": {"caption": "This run's MoCo pretraining: InfoNCE loss (paper Eq. 1), contrastive top-1 accuracy (the positive key ranked first among the queue) and learning rate against optimizer step. The paper shows no training curves. Made by notebook 03-moco.", "name": "fig-pretraining"}}
fig, axes = plt.subplots(1, 3, figsize=(10, 2.6), layout="constrained")
window = max(1, len(loss) // 25)
smooth = lambda x: np.convolve(x, np.ones(window) / window, mode="valid")  # noqa: E731
for ax, values, label in ((axes[0], loss, "InfoNCE loss"), (axes[1], top1, "contrastive top-1")):
    ax.plot(step, values, lw=0.5, alpha=0.4, color="C0")
    ax.plot(step[window - 1:], smooth(values), color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
axes[0].axhline(np.log(1 + cfg.pretrain.queue_size), color="k", ls=":", lw=1)
axes[0].text(step[0], np.log(1 + cfg.pretrain.queue_size), " log(1+K): chance", va="bottom", fontsize=7)
axes[2].plot(step, lr)
axes[2].set_xlabel("step")
axes[2].set_ylabel("learning rate")
save_figure(fig, "pretraining_curves", paths, prov, cfg.book.dpi)

# %% [markdown]
# A loss near $\log(1+K)$ means the query cannot tell its key from the queue; it starts low
# (the queue first holds random vectors), rises as real keys fill the queue, and falls as the
# encoder learns. Whether the representations are *useful* is for the next chapters to
# measure (morphology, photometric redshifts, similarity search).
#
# ## The checkpoint
#
# The checkpoint keeps the authors' published MoCo layout (`state_dict` with
# `module.encoder_q.*`, `module.encoder_k.*`, `module.queue`), so the loader that reads their
# `pretrained_paper_model.pth.tar` reads it too, with `torch.load(weights_only=True)`.

# %%
encoder, report = load_encoder(ckpt, cfg.pretrain.encoder)
n_params = sum(t.numel() for t in encoder.parameters())
last = slice(max(0, len(loss) - max(1, len(loss) // 10)), None)
rows = [("checkpoint layout", report.layout),
        ("encoder tensors missing / unexpected", f"{len(report.missing)} / {len(report.unexpected)}"),
        ("encoder parameters", n_params),
        ("steps", int(step[-1])),
        ("InfoNCE loss, last 10% of steps", float(loss[last].mean())),
        ("contrastive top-1, last 10% of steps", float(top1[last].mean())),
        ("chance loss log(1+K)", float(np.log(1 + cfg.pretrain.queue_size)))]
Table(("quantity", here), tuple(rows), prov, caption="The pretrained encoder", digits=3)

# %%
metrics = {"steps": int(step[-1]), "final_loss": float(loss[last].mean()), "final_top1": float(top1[last].mean()),
           "median_images_per_s": float(np.median(rate)), "checkpoint": str(ckpt.relative_to(paths.shared)),
           "encoder_parameters": n_params, "representation_dim": representation_dim(cfg.pretrain.encoder)}
record = write_metrics("pretraining", metrics, paths, prov)
print(f"wrote {record.relative_to(paths.root.parent)}")

# %% [markdown]
# ## Reproduce
#
# The same run from the command line (the chapter calls the same function):
#
# ```bash
# .venv/bin/python scripts/pretrain.py --profile default            # this chapter's run, 2 CPU cores
# .venv/bin/python scripts/pretrain.py --profile default --resume   # continue it after a kill
# torchrun --nproc_per_node=8 scripts/pretrain.py --profile paper   # the paper's run, 8 GPUs
# sbatch --nodes=2 scripts/slurm/pretrain_paper.sbatch              # several nodes (SLURM)
# ```
#
# The paper trained ~50 epochs of ~1.3M images in 12 hours on 8 V100 GPUs (Appendix E.1),
# about 190 images/s per GPU; `benchmarks/bench_pretrain.py` measures this implementation's
# throughput (figures and machines in {doc}`/book/reproduce`).
#
# ## Summary
#
# The pretraining the paper describes runs here end to end, on this run's data, and leaves a
# checkpoint in the authors' layout. **What next.** The representation space, morphology and
# photometric redshifts chapters use this encoder.
