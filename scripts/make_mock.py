#!/usr/bin/env python
"""Generate a mock SDSS survey in the authors' HDF5 format.

    python scripts/make_mock.py --n 20000 --seed 2021 --workers 2 --out runs/default/mock.h5
"""
import argparse
import logging
import time

from sdsscl.mock import generate_mock


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="number of galaxies")
    ap.add_argument("--seed", type=int, required=True, help="random seed (same seed, same file)")
    ap.add_argument("--out", required=True, help="output HDF5 path")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (result is identical)")
    ap.add_argument("--chunk", type=int, default=64, help="galaxies per work unit / resume step")
    ap.add_argument("--overwrite", action="store_true", help="replace a file made with other settings")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    path = generate_mock(args.out, n=args.n, seed=args.seed, workers=args.workers,
                         progress=not args.quiet, chunk=args.chunk, overwrite=args.overwrite)
    logging.info("wrote %s in %.1f s", path, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
