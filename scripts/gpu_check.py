#!/usr/bin/env python
"""The whole pipeline of a profile on one GPU, end to end, with the time of each stage.

    python scripts/gpu_check.py --profile smoke --device cuda --runs-dir /tmp/runs

Stages: the mock survey and its splits (what notebook 01 saves), MoCo pretraining (bf16,
channels_last), extraction of the representations, the GZ2 morphology sweep and the photo-z
sweep. Every stage runs through the same library calls as the scripts and the book, so this is
the check that the CUDA code paths work together; the printed metrics are the smoke profile's
(machinery, not science). Needs what the book needs except the notebook tools.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

import torch

from sdsscl import downstream
from sdsscl.config import load_profile, parse_override
from sdsscl.data import SurveyDataset, has_specz
from sdsscl.provenance import data_files, ensure_mock, run_paths, training_mad, write_splits
from sdsscl.representations import load_representations, run_extraction
from sdsscl.train import run_pretraining


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    paths = run_paths(profile, args.runs_dir)
    times = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
        print(f"{name:14s} {times[name]:8.1f} s", flush=True)
        return out

    def splits():
        files = data_files(profile, paths)
        survey = SurveyDataset(sorted(set(files["unlabelled"]) | set(files["labelled"])))
        write_splits(profile, paths, survey.subset(has_specz(survey.column("specz_redshift"))))
        training_mad(profile, paths, survey)

    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"torch {torch.__version__}, profile {profile.run_name}, runs in {paths.root}")
    if profile.data.source == "mock":
        stage("mock", lambda: ensure_mock(profile, paths, progress=False))
    stage("splits", splits)
    ckpt = stage("pretraining", lambda: run_pretraining(profile, args.runs_dir, resume="auto",
                                                        device=args.device, progress=False))
    reps = stage("extraction", lambda: run_extraction(profile, args.runs_dir, device=args.device, progress=False))
    morph = stage("morphology", lambda: downstream.run_morphology(profile, args.runs_dir, device=args.device,
                                                                  progress=False))
    photoz = stage("photoz", lambda: downstream.run_photoz(profile, args.runs_dir, device=args.device,
                                                           progress=False))
    print(json.dumps({
        "checkpoint": str(ckpt), "representations": str(reps), "dimension": load_representations(reps).dim,
        "morphology_networks": len(morph["runs"]), "photoz_networks": len(photoz["runs"]),
        "seconds": {k: round(v, 1) for k, v in times.items()}}, indent=1))


if __name__ == "__main__":
    main()
