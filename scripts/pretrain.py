#!/usr/bin/env python
"""MoCo v2 pretraining with a profile's settings (paper Section 2, Appendix E.1).

One process:       python scripts/pretrain.py --profile default
One node, 8 GPUs:  torchrun --nproc_per_node=8 scripts/pretrain.py --profile paper
Many nodes:        scripts/slurm/pretrain_paper.sbatch (torchrun rendezvous on the first node)
Continue a run:    add --resume (it restarts exactly from the last checkpoint)

Artifacts: runs/<profile>/checkpoints/moco/{checkpoint.pth.tar, log.csv, tensorboard/, config.json}.
"""
import argparse
import logging

from sdsscl.config import load_profile, parse_override
from sdsscl.train import run_pretraining


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", help="smoke, default or paper (profiles/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set pretrain.epochs=10 --set data.root=/data/sdss")
    ap.add_argument("--runs-dir", default=None, help="artifact root (default: runs/)")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)")
    ap.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (with a checkpoint)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    ckpt = run_pretraining(profile, args.runs_dir, resume=args.resume, device=args.device,
                           max_steps=args.max_steps, progress=not args.no_progress)
    logging.info("checkpoint: %s", ckpt)


if __name__ == "__main__":
    main()
