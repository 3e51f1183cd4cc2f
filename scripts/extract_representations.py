#!/usr/bin/env python
"""Representations of every galaxy of a profile from its MoCo checkpoint (paper Section 3.1).

One process:       python scripts/extract_representations.py --profile default
One node, 8 GPUs:  torchrun --nproc_per_node=8 scripts/extract_representations.py --profile paper
Another encoder:   add --checkpoint PATH (e.g. the authors' pretrained_paper_model.pth.tar)

Writes runs/<profile>/representations/moco.h5 (float16 by default: representations.dtype).
A killed run continues where it stopped; a rerun with the same checkpoint and data does nothing.
"""
import argparse
import logging

from sdsscl.config import load_profile, parse_override
from sdsscl.representations import run_extraction


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", help="smoke, default or paper (profiles/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set representations.dtype=float32")
    ap.add_argument("--runs-dir", default=None, help="artifact root (default: runs/)")
    ap.add_argument("--checkpoint", default=None,
                    help="encoder checkpoint (default: runs/<profile>/checkpoints/moco/checkpoint.pth.tar)")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    out = run_extraction(profile, args.runs_dir, checkpoint=args.checkpoint, device=args.device,
                         progress=not args.no_progress)
    print(f"representations: {out}")


if __name__ == "__main__":
    main()
