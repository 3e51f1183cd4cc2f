#!/usr/bin/env python
"""The galaxies most similar to some query galaxies (paper Appendix B.1, Figure 7).

    python scripts/similar.py --profile default --index 0 17 256
    python scripts/similar.py --profile paper --objid 1237648720693755918 --k 5 --out fig7.png

Searches the profile's representations (scripts/extract_representations.py writes them) with
its index (representations.search_index), prints each query's neighbours with their cosine
similarities, and draws the Figure 7 grid (default: runs/<profile>/figures/similar.png).
"""
import argparse
import logging
from pathlib import Path

from sdsscl.config import load_profile, parse_override
from sdsscl.data import atomic_path
from sdsscl.provenance import Provenance, run_paths, stamp_figure
from sdsscl.search import find_similar


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default", help="smoke, default or paper (profiles/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting, e.g. --set representations.search_index=hnsw")
    ap.add_argument("--runs-dir", default=None, help="artifact root (default: runs/)")
    queries = ap.add_mutually_exclusive_group(required=True)
    queries.add_argument("--index", type=int, nargs="+", help="query galaxies by position in the survey")
    queries.add_argument("--objid", type=int, nargs="+", help="query galaxies by SDSS ObjID")
    ap.add_argument("--k", type=int, default=None, help="neighbours per query (default: representations.neighbours)")
    ap.add_argument("--out", default=None, help="figure file (default: runs/<profile>/figures/similar.png)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    by, ids = ("index", args.index) if args.index is not None else ("objid", args.objid)
    result, fig = find_similar(profile, ids, by=by, k=args.k, runs_dir=args.runs_dir)
    for q, objids, sims in zip(ids, result.objids, result.similarity):
        print(f"{by} {q}: " + ", ".join(f"{o} ({s:.5f})" for o, s in zip(objids, sims)))
    out = Path(args.out) if args.out else run_paths(profile, args.runs_dir).figure("similar")
    out.parent.mkdir(parents=True, exist_ok=True)
    stamp_figure(fig, Provenance.of(profile))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=out.suffix.lstrip(".") or "png", dpi=profile.book.dpi, bbox_inches="tight")
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
