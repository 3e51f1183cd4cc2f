#!/usr/bin/env python
"""Mock-survey generation rate on this machine: galaxies per second, end to end.

    python benchmarks/bench_mock.py --n 3000 --workers 1 2

Each run writes a fresh file (population, rendering, votes, HDF5) into a temporary folder;
the kcorrect template set-up (a few seconds, once per process) is timed separately, as the
first step of every generation. Target (issue 2): >= 150 galaxies/s on 2 cores.
"""
import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from sdsscl.mock import generate_mock
from sdsscl.mock.reference import fit_reference_seds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    fit_reference_seds()
    setup = time.perf_counter() - t0
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python={platform.python_version()}")
    print(f"kcorrect set-up and template fits of the reference galaxies: {setup:.1f} s (once per process)")
    print(f"{'workers':>8} {'galaxies':>9} {'seconds':>8} {'galaxies/s':>11} {'MB/s written':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            path = Path(tmp) / f"bench_w{w}.h5"
            t0 = time.perf_counter()
            generate_mock(path, n=args.n, seed=args.seed, workers=w, progress=False)
            dt = time.perf_counter() - t0
            mb = path.stat().st_size / 1e6
            print(f"{w:>8} {args.n:>9} {dt:>8.1f} {args.n / dt:>11.0f} {mb / dt:>13.0f}")
            path.unlink()


if __name__ == "__main__":
    main()
