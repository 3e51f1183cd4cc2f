#!/usr/bin/env python
"""Test-set photo-z of the supervised CNN and of fine-tuning recipes, at several step budgets.

    .venv/bin/python benchmarks/photoz_recipes.py --steps 120 400 --fractions 0.1 0.3 1.0 --seeds 0 1
    python3 benchmarks/photoz_recipes.py --device cuda --steps 200 400 800 --seeds 0 1 2

A diagnostic for the photo-z chapter (issue 7), not part of the book. It trains the networks
of ``06-photoz`` exactly as the chapter does (``downstream._train_and_predict``: the profile's
schedules, de-reddened inputs, rotation and jitter-crop, validation model selection, then the
test split's centre crops) but for a grid of recipes, step budgets (``min_steps = max_steps``),
training fractions and seeds, and prints one line per network and a table of the test
sigma_MAD. Recipes (all Adam, the photo-z schedule of the profile otherwise):

* ``supervised``: from scratch at the head's learning rate (the baseline);
* ``probe-ft``: pretrained encoder x0.1, head started from the linear probe (``head_init: probe``);
* ``random-ft``: pretrained encoder x0.1, new random head (the paper, Appendix E.2);
* ``random-ft-x1``: pretrained encoder at the head's rate, new random head.

Each finished network is appended to ``--out`` (JSON lines) at once, so a run stopped by a time
limit keeps what it finished. Needs the profile's pretraining, splits and mock.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sdsscl import downstream as ds
from sdsscl.config import load_profile, parse_override
from sdsscl.metrics import photoz_metrics
from sdsscl.provenance import run_paths

RECIPES = ("supervised", "probe-ft", "random-ft", "random-ft-x1")


def photoz_inputs(profile):
    """The profile's run paths, photo-z task, labelled data (de-reddened), spec-z and bin targets."""
    paths = run_paths(profile)
    task = ds.photoz_task(profile.photoz.bins, profile.photoz.z_max)
    data = ds.labelled_data(profile, paths, deredden=True, columns=("specz_redshift",))
    z = data.dataset.column("specz_redshift").astype(np.float64)
    return paths, task, data, z, task.bins.encode(z)


def schedule_of(profile, recipe: str, steps: int):
    cfg = profile.photoz
    base = cfg.supervised if recipe == "supervised" else cfg.finetune
    extra = {"probe-ft": {"head_init": "probe"}, "random-ft": {"head_init": "random"},
             "random-ft-x1": {"head_init": "random", "encoder_lr_factor": 1.0}}.get(recipe, {})
    return replace(base, min_steps=steps, max_steps=steps, **extra)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--recipes", nargs="+", choices=RECIPES, default=["supervised", "random-ft", "random-ft-x1"])
    ap.add_argument("--steps", nargs="+", type=int, default=[400])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 1.0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="JSON-lines file of results (appended)")
    args = ap.parse_args(argv)
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    cfg = profile.photoz
    paths, task, data, z, target = photoz_inputs(profile)
    rows = data.split_rows
    ckpt = ds.moco_checkpoint(paths)
    reps = None
    if "probe-ft" in args.recipes:
        reps = ds.representations_of(ckpt, profile.pretrain.encoder, data.images, profile.augment.crop_size)
    n_train = len(rows["train"])
    print(f"profile {profile.run_name}, device {args.device}: {n_train} training, {len(rows['val'])} validation, "
          f"{len(rows['test'])} test galaxies", flush=True)
    results = []
    for steps in args.steps:
        for seed in args.seeds:
            for fraction in args.fractions:
                count = max(1, int(round(fraction * n_train)))
                sub = rows["train"][ds.label_subset(n_train, count, seed, profile.data.split_seed)]
                for recipe in args.recipes:
                    kind = "supervised" if recipe == "supervised" else "finetune"
                    t0 = time.perf_counter()
                    with tempfile.TemporaryDirectory() as work:
                        probs, info = ds._train_and_predict(
                            kind, task, data, sub, target[sub], rows["val"], target[rows["val"]],
                            schedule_of(profile, recipe, steps), profile, ckpt, seed, Path(work),
                            torch.device(args.device), False, cfg.probe, reps)
                    m = photoz_metrics(task.bins.expected(probs), z[rows["test"]])
                    rec = {"recipe": recipe, "steps": steps, "fraction": fraction, "seed": seed,
                           "best_step": info["best_step"], "sigma_mad": m["sigma_mad"], "eta": m["eta"],
                           "bias": m["bias"], "seconds": round(time.perf_counter() - t0, 1)}
                    results.append(rec)
                    print(json.dumps(rec), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(rec) + "\n")
    print(f"\ntest sigma_MAD, mean over seeds {args.seeds}")
    print(f"{'steps':>5s} {'fraction':>8s} " + " ".join(f"{r:>13s}" for r in args.recipes))
    for steps in args.steps:
        for fraction in args.fractions:
            cells = []
            for recipe in args.recipes:
                v = [r["sigma_mad"] for r in results if (r["steps"], r["fraction"], r["recipe"]) == (steps, fraction, recipe)]
                cells.append(f"{np.mean(v):13.4f}" if v else f"{'':>13s}")
            print(f"{steps:5d} {fraction:8g} " + " ".join(cells))


if __name__ == "__main__":
    main()
