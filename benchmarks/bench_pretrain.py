#!/usr/bin/env python
"""MoCo v2 training throughput (images/s): augmentation + query/key encoders + SGD step.

    python benchmarks/bench_pretrain.py --profile default            # this CPU
    python benchmarks/bench_pretrain.py --profile paper --device cuda  # ResNet50, bf16, batch 256

Batches are random 5x107x107 tensors already on the device, so the figure is what the model
and the augmentations sustain; reading HDF5 is measured separately with ``--data PATH``
(then batches come through the same DataLoader as training). The paper: ~50 epochs of ~1.3M
images in 12 h on 8 V100s, about 190 images/s per GPU; the target on one H100 is 5,000/s.
Measured on one H100 80GB (torch 2.11, batch 256): 2,270 images/s. With the stride-1 stem a
64x64 crop costs what a 256x256 image costs a standard ResNet50, ~5.4 GMAC forward, so ~43 GFLOP
per image (query forward and backward, key forward): ~100 TFLOP/s, an eighth of the chip's bf16
rate -- there is room (torch.compile, larger per-GPU batches).
"""
import argparse
import platform
import time

import torch

from sdsscl.augment import TwoViews
from sdsscl.config import load_profile
from sdsscl.moco import MoCo
from sdsscl.train import augmentation_pipeline


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the profile's")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data", default=None, help="read batches from this HDF5 file instead")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)

    profile = load_profile(args.profile)
    cfg = profile.pretrain
    bs = args.batch_size or cfg.batch_size
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    model = MoCo(cfg.encoder, queue_size=max(cfg.queue_size // bs, 1) * bs,
                 key_momentum=cfg.key_momentum, temperature=cfg.temperature,
                 key_bn_splits=cfg.key_bn_splits).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.03,
                          momentum=0.9, weight_decay=1e-4)
    views = TwoViews(augmentation_pipeline(profile.augment, mad=torch.full((5,), 0.03)))
    gen = torch.Generator().manual_seed(0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    if args.data:
        from torch.utils.data import DataLoader

        from sdsscl.data import SurveyDataset

        ds = SurveyDataset(args.data)
        loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True,
                            num_workers=cfg.num_workers if args.workers is None else args.workers,
                            collate_fn=lambda items: torch.stack([it["image"] for it in items]),
                            pin_memory=cuda, persistent_workers=True)
        batches = iter(loader)
        next_batch = lambda: next(batches).to(dev, non_blocking=True)  # noqa: E731
    else:
        fixed = torch.rand(bs, 5, 107, 107, device=dev)
        next_batch = lambda: fixed  # noqa: E731

    def step():
        x = next_batch()
        q, k = views(x, gen)
        if cuda:
            q = q.contiguous(memory_format=torch.channels_last)
            k = k.contiguous(memory_format=torch.channels_last)
        with amp:
            loss, _ = model(q, k, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    name = torch.cuda.get_device_name(dev) if cuda else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}")
    print(f"profile {args.profile}: {cfg.encoder.arch} width {cfg.encoder.width} stem stride "
          f"{cfg.encoder.stem_stride}, batch {bs}, augmentations {list(profile.augment.enabled)}, "
          f"{'bf16 autocast' if cuda else 'float32'}, data {'HDF5 ' + args.data if args.data else 'in memory'}")
    print(f"{args.steps} steps in {dt:.2f} s: {args.steps * bs / dt:,.0f} images/s")


if __name__ == "__main__":
    main()
