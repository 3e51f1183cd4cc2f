"""Throughput of the two-view augmentation pipeline against an authors-style per-image reference.

Times ``TwoViews(AugmentationPipeline(...))`` from ``sdsscl.augment`` on one batch of
``(B, 5, 107, 107)`` images -> two ``(B, 5, 64, 64)`` views, for the paper's best set (all but the
PSF, Appendix D) and for all five augmentations, and, side by side on the same batch, a
reference written the way the authors' loader works: one image at a time, numpy and
scikit-image (reddening multiply, ``scipy.ndimage.gaussian_filter`` per band,
``skimage.transform.rotate`` bilinear, integer jitter crop, numpy Gaussian noise).

    .venv/bin/python benchmarks/bench_augment.py                    # CPU
    .venv/bin/python benchmarks/bench_augment.py --device cuda      # GPU (reference still on CPU);
                                                                    # parameters drawn on the CPU and on the GPU
    .venv/bin/python benchmarks/bench_augment.py --device cuda --batch-size 256 1024 4096
    .venv/bin/python benchmarks/bench_augment.py --device cuda --draws device --no-cuda-graphs

Views/s counts augmented 64x64 views (two per image per call), over rounds of calls run back to
back as in training (on a GPU the host prepares the next call while the device runs the last;
one synchronisation per round). Each round follows one pass of the reference, and the ratio is
the median over rounds of each round's views/s over its own reference pass's: pairs measured
within about a second of each other, so that a change in the machine's load between the two
halves of a run does not enter the ratio. Timings on a shared machine vary with its load, which
the script prints: on the CPU the pipeline's threads (one per torch thread, each running the
compiled kernel on a slice of the batch) wait for each other whenever another process holds a
core, so compare ``--threads 1`` (one core each) there, and read the best round as the
uncontended speed. The warm-up calls include compiling that kernel (or loading it from numba's
cache), which the timed rounds do not.
``--profile`` splits a call into drawing the parameters (host) and applying them, and lists the
costliest torch operations.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from skimage.transform import rotate as sk_rotate

from sdsscl.augment import _GRAPH_MAX_IMAGES, AUGMENTATIONS, BEST_AUGMENTATIONS, AugmentationPipeline, TwoViews
from sdsscl.constants import CROP_SIZE, CUTOUT_SIZE, MAX_JITTER, PIXEL_SCALE, R_BAND, R_SF11, WAVELENGTH_EFF


def make_batch(n: int, seed: int) -> np.ndarray:
    """A random batch of galaxy-like ugriz cutouts in nanomaggies, (n, 5, 107, 107) float32."""
    rng = np.random.default_rng(seed)
    size = CUTOUT_SIZE
    yy, xx = np.mgrid[0:size, 0:size] - size // 2
    sky = np.array([0.041, 0.0165, 0.0275, 0.044, 0.19])[None, :, None, None]   # DATA-FACTS, nmgy
    q = rng.uniform(0.3, 1.0, n)[:, None, None]
    phi = rng.uniform(0, np.pi, n)[:, None, None]
    re = rng.uniform(3, 12, n)[:, None, None]
    xr = xx * np.cos(phi) + yy * np.sin(phi)
    yr = (-xx * np.sin(phi) + yy * np.cos(phi)) / q
    profile = np.exp(-np.sqrt(xr**2 + yr**2) / re)                                  # (n, H, W)
    colour = np.array([0.3, 1.0, 1.6, 2.0, 2.3])[None, :, None, None]
    images = rng.uniform(0.5, 5, (n, 1, 1, 1)) * colour * profile[:, None] + rng.normal(0, 1, (n, 5, size, size)) * sky
    return images.astype(np.float32)


def mad_per_band(images: np.ndarray) -> np.ndarray:
    """Per-band median absolute deviation over the batch (the data layer's job in training)."""
    x = images.transpose(1, 0, 2, 3).reshape(5, -1)
    return np.median(np.abs(x - np.median(x, axis=1, keepdims=True)), axis=1)


def reference_view(img: np.ndarray, rng: np.random.Generator, mad: np.ndarray, psf: bool) -> np.ndarray:
    """One view of one (5, 107, 107) image, the authors' way: numpy/scikit-image, one image at a time."""
    ebv = rng.uniform(0, 0.5)
    img = img * (10 ** (-0.4 * R_SF11 * ebv))[:, None, None]
    if psf:
        sigma_r = abs(rng.normal(0, 0.13)) / PIXEL_SCALE
        scale = (WAVELENGTH_EFF / WAVELENGTH_EFF[R_BAND]) ** -0.3
        img = np.stack([gaussian_filter(img[b], sigma_r * scale[b]) for b in range(5)])
    angle = rng.uniform(0, 360)
    img = sk_rotate(img.transpose(1, 2, 0), angle, order=1, mode="constant", cval=0,
                    preserve_range=True, clip=False).transpose(2, 0, 1)
    cy = img.shape[1] // 2 + rng.integers(-MAX_JITTER, MAX_JITTER + 1)
    cx = img.shape[2] // 2 + rng.integers(-MAX_JITTER, MAX_JITTER + 1)
    half = CROP_SIZE // 2
    img = img[:, cy - half:cy + half, cx - half:cx + half]
    level = rng.uniform(1, 3)
    return (img + rng.normal(0, 1, img.shape) * (level * mad)[:, None, None]).astype(np.float32)


def reference_pass(images: np.ndarray, mad: np.ndarray, psf: bool, rng: np.random.Generator) -> float:
    """Seconds for two views of every image."""
    t0 = time.perf_counter()
    for img in images:
        reference_view(img, rng, mad, psf)
        reference_view(img, rng, mad, psf)
    return time.perf_counter() - t0


def time_torch(views: TwoViews, batch: torch.Tensor, repeats: int, warmup: int, seed: int,
               rounds: int = 5, draw_on_device: bool = False, before_round=None) -> list[float]:
    """Seconds per call of ``views(batch)`` (both views, parameters drawn included), one value
    per round of ``repeats`` calls run back to back, as a training loop runs them: on a GPU the
    host draws and launches the next call while the device still works on the last, and the
    round ends with one synchronisation. ``draw_on_device``: a generator on the batch's device
    (the parameters drawn there) instead of a CPU one. ``before_round``: called (untimed) before
    each round, e.g. a reference pass to pair with it, and then followed by one untimed call, so
    that every round starts with warm caches and threads like the first."""
    gen = torch.Generator(device=batch.device if draw_on_device else "cpu").manual_seed(seed)
    cuda = batch.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(batch.device)) if cuda else (lambda: None)
    for _ in range(warmup):
        views(batch, gen)
    sync()
    times = []
    for _ in range(rounds):
        if before_round is not None:
            before_round()
            views(batch, gen)                 # untimed: the round starts warm, as the first did
            sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            views(batch, gen)
        sync()
        times.append((time.perf_counter() - t0) / repeats)
    return times


def profile_calls(views: TwoViews, batch: torch.Tensor, seed: int, calls: int = 20) -> None:
    """Where one two-view call spends its time: drawing the parameters (host) against applying
    them, then the torch operations with the most host time."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(seed)
    cuda = batch.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(5):
        views(batch, gen)
    sync()
    if batch.device.type == "cpu":
        def draw():
            return views.sample(batch.shape[0], gen, device=batch.device)

        def run(params):
            views.apply(batch, params)
    else:                                   # what views(batch) does on a GPU: the host's part first
        def draw():
            return views._host_work(batch, gen)

        def run(job):
            views.pipeline._run(*job, copies=2)
    t0 = time.perf_counter()
    jobs = [draw() for _ in range(calls)]
    sync()
    t1 = time.perf_counter()
    for job in jobs:
        run(job)
    sync()
    t2 = time.perf_counter()
    print(f"\nper call of {batch.shape[0]} images (best set): drawing {1e3 * (t1 - t0) / calls:.3f} ms "
          f"(host: parameters, plan, its copy to the device), applying {1e3 * (t2 - t1) / calls:.3f} ms")
    if not cuda:   # the host's part of a GPU call, with a shape-only ("meta") batch for the device
        meta = torch.empty(batch.shape, device="meta")
        t0 = time.perf_counter()
        for _ in range(10 * calls):
            views._host_work(meta, gen)
        print(f"host work of the same call on a GPU (draw, plan, packing; a 'meta' batch stands in for "
              f"the device, so no copy is made): {1e3 * (time.perf_counter() - t0) / (10 * calls):.3f} ms")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            views(batch, gen)
        sync()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def machine(device: torch.device) -> dict[str, str]:
    cpu = platform.processor() or ""
    if not cpu and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    info = {
        "cpu": cpu or platform.machine(),
        "cpu count": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu or platform.machine()})",
    }
    if hasattr(os, "getloadavg"):
        info["load average (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[256],
                        help="images per call; several sizes give one row each (default: 256)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="calls per timed round (default: 10)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="timed rounds per pipeline and batch size, each after one reference pass "
                             "(default: 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    parser.add_argument("--ref-images", type=int, default=128,
                        help="images of the batch the per-image reference runs on (default: 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--draws", choices=("cpu", "device", "both"), default=None,
                        help="where the parameters are drawn: a CPU generator (the same views on every "
                             "device), one on the GPU (TwoViews' fast path), or both rows "
                             "(default: both on a GPU, cpu on the CPU)")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="TwoViews(cuda_graphs=...) for the GPU-draw rows (default: on; "
                             "--no-cuda-graphs runs the same operations one by one)")
    parser.add_argument("--profile", action="store_true",
                        help="also split one call into drawing and applying, and list the costliest "
                             "torch operations (torch.profiler), at the first batch size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")

    draws = args.draws or ("both" if device.type != "cpu" else "cpu")
    if draws != "cpu" and device.type == "cpu":
        parser.error("--draws device needs a GPU (--device cuda)")
    modes = {"cpu": [False], "device": [True], "both": [False, True]}[draws]
    sizes = args.batch_size
    images = make_batch(max(sizes), args.seed)
    mad = mad_per_band(images)
    full = torch.from_numpy(images).to(device)

    print(f"Two-view augmentation throughput: B x 5 x {CUTOUT_SIZE} x {CUTOUT_SIZE} "
          f"-> 2 x {CROP_SIZE} x {CROP_SIZE}, float32, B = {', '.join(map(str, sizes))}")
    for key, value in machine(device).items():
        print(f"  {key:22s} {value}")
    print(f"  {'per-band MAD (nmgy)':22s} {np.array2string(mad, precision=4)}")
    print()
    rows = []
    n_ref = min(args.ref_images, max(sizes))
    for label, names in (("best set (no PSF)", BEST_AUGMENTATIONS), ("all five (with PSF)", AUGMENTATIONS)):
        views = TwoViews(AugmentationPipeline(names, mad=mad), cuda_graphs=args.cuda_graphs)
        rng = np.random.default_rng(args.seed)
        for on_device in modes:
            for size in sizes:
                batch = full[:size].contiguous()
                ref_times = []
                ours = 2 * size / np.array(time_torch(
                    views, batch, args.repeats, args.warmup, args.seed, rounds=args.rounds, draw_on_device=on_device,
                    before_round=lambda: ref_times.append(reference_pass(images[:n_ref], mad, "psf" in names, rng))))
                ref = 2 * n_ref / np.array(ref_times)
                where = device.type if on_device else "cpu"
                rows.append((label, where, size, np.median(ours), ours.max(), np.median(ref), ref.max(),
                             np.median(ours / ref)))
    header = (f"{'pipeline':21s} {'draws':>5s} {'B':>5s} {'sdsscl views/s':>15s} {'(best)':>10s} "
              f"{'reference views/s':>18s} {'(best)':>8s} {'ratio':>8s} {'(best)':>8s}")
    print(header)
    print("-" * len(header))
    for label, where, size, ours, ours_best, ref, ref_best, ratio in rows:
        print(f"{label:21s} {where:>5s} {size:5d} {ours:15,.0f} {ours_best:10,.0f} {ref:18,.0f} {ref_best:8,.0f} "
              f"{ratio:7.1f}x {ours_best / ref_best:7.1f}x")
    if args.profile:
        profile_calls(TwoViews(AugmentationPipeline(BEST_AUGMENTATIONS, mad=mad)), full[:sizes[0]].contiguous(),
                      args.seed)
    print()
    print(f"views/s: 64x64 views produced per second (2 per image), median and best of {args.rounds} rounds; draws: "
          f"where the parameters are drawn (cpu: a CPU generator; cuda: one on the GPU, which\n"
          f"TwoViews replays as a CUDA graph per batch shape up to {_GRAPH_MAX_IMAGES} images without the PSF"
          f"{'' if args.cuda_graphs else ', here turned off'});\n"
          f"ratio: median over rounds of sdsscl / reference, each round against the reference pass just before it "
          f"(best: best / best).\nsdsscl: {device.type}, rounds of {args.repeats} back-to-back calls "
          f"(one synchronisation per round) after {args.warmup} warm-up calls, parameters drawn in every call. "
          f"reference: "
          f"numpy/scikit-image on the CPU,\none image at a time in one process, {n_ref} images x 2 views, "
          f"one pass before each round. Load average after the run: {os.getloadavg()[0]:.2f}.")


if __name__ == "__main__":
    main()
