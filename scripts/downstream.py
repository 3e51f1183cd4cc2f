#!/usr/bin/env python
"""Downstream tasks with a profile's settings (paper Sections 3.2-3.3, Appendices C-E).

    python scripts/downstream.py morphology --profile default   # GZ2: supervised, probe, fine-tuned
    python scripts/downstream.py photoz --profile default       # photo-z: supervised, fine-tuned, photometry
    python scripts/downstream.py ablation --profile default     # Figure 13: pretraining per augmentation set
    torchrun --nproc_per_node=8 scripts/downstream.py photoz --profile paper

Needs the profile's pretrained encoder (scripts/pretrain.py) and splits (notebook 01-data).
Every network's result lands in runs/<profile>/downstream/<task>/, the summary in
runs/<profile>/metrics/<task>.json; a rerun skips finished networks and resumes a killed one.
"""
import argparse
import logging

from sdsscl import downstream
from sdsscl.config import load_profile, parse_override

TASKS = {"morphology": downstream.run_morphology, "photoz": downstream.run_photoz,
         "ablation": downstream.run_ablation}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", choices=sorted(TASKS))
    ap.add_argument("--profile", default="default", help="smoke, default or paper (profiles/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set morphology.label_counts=[256]")
    ap.add_argument("--runs-dir", default=None, help="artifact root (default: runs/)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    TASKS[args.task](profile, args.runs_dir, device=args.device, progress=not args.no_progress)
    logging.info("metrics: runs/%s/metrics/%s.json", profile.run_name, args.task)


if __name__ == "__main__":
    main()
