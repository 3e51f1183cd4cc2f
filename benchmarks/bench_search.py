#!/usr/bin/env python
"""Similarity search at survey scale: numpy brute force against faiss flat, IVF and HNSW.

    python benchmarks/bench_search.py                          # 1,000,000 x 128-d, this CPU
    python benchmarks/bench_search.py --n 200000 --dim 2048    # the paper's dimension
    python benchmarks/bench_search.py --device cuda            # extraction on a GPU

The vectors are random but clustered (``--clusters`` Gaussian groups, as galaxies of a kind
group in the representation space; ``--clusters 0`` for structureless ones, the hardest case
for approximate indexes), L2-normalised float32. ``--queries`` held-out vectors of the same
distribution are searched for their ``--k`` nearest; recall@k is against the exact numpy
result. Memory: N x D x 4 bytes per copy (1M x 128: 0.5 GB; 1M x 2048: 8 GB, so use a
smaller --n at the paper's dimension); each index holds about two copies while it is measured.

Measured side by side: build time, throughput (queries/s for one batch of --queries), the
median latency of one query at a time (--single of them), recall@k, and the speedups over
numpy. Then the extraction throughput of the profile's encoder (images/s, centre crop and
forward pass, batches of --batch-size random 107x107 cutouts; HDF5 reading not included).
Prints a Markdown table naming the machine.
"""
import argparse
import logging
import math
import os
import platform
import time

import faiss
import numpy as np
import torch

from sdsscl.config import load_profile
from sdsscl.models import build_encoder
from sdsscl.representations import encode, l2_normalize
from sdsscl.search import (
    SimilarityIndex,
    brute_force_search,
    recall_at_k,
    set_faiss_threads,
)

log = logging.getLogger("bench_search")


def clustered_vectors(n: int, dim: int, clusters: int, spread: float, seed: int) -> np.ndarray:
    """n L2-normalised float32 vectors: random centres N(0, 1) plus N(0, spread^2) noise
    (spread 1: each cluster is as wide as the centres are far apart, so clusters overlap);
    without clusters, uniform on the sphere."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    centres = rng.standard_normal((max(clusters, 1), dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: no float64 temporaries of the whole set
        m = min(n, s + 100_000) - s
        block = rng.standard_normal((m, dim), dtype=np.float32)
        if clusters:
            block = centres[rng.integers(clusters, size=m)] + spread * block
        out[s:s + m] = l2_normalize(block)
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def single_latency_ms(search_one, queries: np.ndarray) -> float:
    """Median wall time of searching one query at a time, in ms."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        search_one(q[None])
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def bench_numpy(base, queries, k, single):
    (idx, _), t = timed(brute_force_search, base, queries, k, 256)
    lat = single_latency_ms(lambda q: brute_force_search(base, q, k), queries[:single])
    return idx, {"method": "numpy brute force", "settings": "matmul + argpartition, 256 queries/batch",
                 "build_s": 0.0, "qps": len(queries) / t, "latency_ms": lat, "recall": 1.0}


def bench_index(base, queries, exact, k, single, kind, build_kw, search_settings):
    """Rows for one faiss index kind: one build, then each search setting."""
    index, build_s = timed(lambda: SimilarityIndex(base, kind=kind, **build_kw))
    rows = []
    for label, apply in search_settings:
        apply(index.index)
        res, t = timed(index.search, queries, k, "vector")
        lat = single_latency_ms(lambda q: index.search(q, k, by="vector"), queries[:single])
        rows.append({"method": f"faiss {kind}", "settings": label, "build_s": build_s,
                     "qps": len(queries) / t, "latency_ms": lat, "recall": recall_at_k(res.indices, exact)})
        log.info("%s %s: %.0f queries/s, %.2f ms, recall %.3f", kind, label, rows[-1]["qps"], lat,
                 rows[-1]["recall"])
    return rows  # the index is freed here, before the next kind is built


def bench_extraction(profile_name: str, device: str, batch_size: int, batches: int) -> tuple[float, str]:
    cfg = load_profile(profile_name).pretrain.encoder
    dev = torch.device(device)
    torch.manual_seed(0)
    encoder = build_encoder(cfg).to(dev)
    images = torch.rand(batch_size, 5, 107, 107)
    for _ in range(2):  # warm-up (kernel selection)
        encode(encoder, images, batch_size=batch_size)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        encode(encoder, images, batch_size=batch_size)  # returns on the CPU: synchronised
    rate = batches * batch_size / (time.perf_counter() - t0)
    what = f"{cfg.arch} width {cfg.width} stem stride {cfg.stem_stride} ({profile_name}), batch {batch_size}, {dev}"
    return rate, what


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    ap.add_argument("--dim", type=int, default=128, help="their dimension (paper: 2048)")
    ap.add_argument("--clusters", type=int, default=1000, help="Gaussian groups (0: structureless)")
    ap.add_argument("--spread", type=float, default=1.0, help="cluster width relative to the centres' spread")
    ap.add_argument("--queries", type=int, default=1000, help="queries in the throughput batch")
    ap.add_argument("--single", type=int, default=30, help="queries timed one at a time")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nlist", type=int, default=None, help="IVF cells (default 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivf", "hnsw"], choices=["flat", "ivf", "hnsw"])
    ap.add_argument("--profile", default="default", help="whose encoder the extraction benchmark runs")
    ap.add_argument("--device", default="cpu", help="extraction device")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--extract-batches", type=int, default=5, help="0: skip the extraction benchmark")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    threads = set_faiss_threads()
    load_start = os.getloadavg()[0]
    t_start = time.perf_counter()

    data = clustered_vectors(args.n + args.queries, args.dim, args.clusters, args.spread, args.seed)
    base, queries = data[:args.n], data[args.n:]
    log.info("%d x %d vectors (%.2f GB float32), %d queries", args.n, args.dim, base.nbytes / 1e9, args.queries)
    exact, ref = bench_numpy(base, queries, args.k, args.single)
    rows = [ref]
    log.info("numpy: %.0f queries/s, %.2f ms", ref["qps"], ref["latency_ms"])
    nlist = args.nlist or round(4 * math.sqrt(args.n))
    if "flat" in args.kinds:
        rows += bench_index(base, queries, exact, args.k, args.single, "flat", {}, [("exact", lambda i: None)])
    if "ivf" in args.kinds:
        settings = [(f"nlist {nlist}, nprobe {p}", lambda i, p=p: setattr(i, "nprobe", p)) for p in args.nprobe]
        rows += bench_index(base, queries, exact, args.k, args.single, "ivf",
                            {"nlist": nlist, "seed": args.seed}, settings)
    if "hnsw" in args.kinds:
        settings = [(f"M {args.hnsw_m}, efC {args.ef_construction}, efSearch {e}",
                     lambda i, e=e: setattr(i.hnsw, "efSearch", e)) for e in args.ef_search]
        rows += bench_index(base, queries, exact, args.k, args.single, "hnsw",
                            {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}, settings)

    print(f"\n**Similarity search, {args.n:,} x {args.dim}-d clustered random vectors "
          f"({args.clusters} clusters, spread {args.spread}), {args.queries} queries, recall@{args.k} "
          f"vs exact**\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"faiss {faiss.__version__} ({faiss.get_compile_options().strip() or 'generic'}, {threads} threads), "
          f"numpy {np.__version__}, torch {torch.__version__}; load average {load_start:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end (a shared machine)\n")
    print(f"| method | settings | build (s) | queries/s (batch) | single query (ms) | recall@{args.k} | "
          "speedup batch | speedup single |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['settings']} | {r['build_s']:.1f} | {r['qps']:,.0f} | "
              f"{r['latency_ms']:.2f} | {r['recall']:.3f} | {r['qps'] / ref['qps']:.1f}x | "
              f"{ref['latency_ms'] / r['latency_ms']:.1f}x |")
    if args.extract_batches:
        rate, what = bench_extraction(args.profile, args.device, args.batch_size, args.extract_batches)
        print(f"\nExtraction: {rate:,.0f} images/s ({what}).")
    print(f"Total benchmark time: {time.perf_counter() - t_start:.0f} s.")


if __name__ == "__main__":
    main()
