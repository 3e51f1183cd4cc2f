#!/usr/bin/env python
"""Validation sigma_MAD along a photo-z fine-tuning run, for one way of starting it.

    .venv/bin/python benchmarks/finetune_trace.py --start probe   --steps 60  --encoder-lr-factor 0.1
    .venv/bin/python benchmarks/finetune_trace.py --start frozen-bn --steps 60 --encoder-lr-factor 0
    .venv/bin/python benchmarks/finetune_trace.py --start random  --steps 600
    .venv/bin/python benchmarks/finetune_trace.py --start scratch --steps 600 --encoder-lr-factor 1

A diagnostic for the photo-z chapter (issue 7), not part of the book: it trains one network on
the profile's photo-z training split (all of it, de-reddened, rotation and jitter-crop, Adam,
constant learning rate, batches of 128) and prints the loss and the validation sigma_MAD (on the
first ``--val`` validation galaxies, centre crops) six times along the run. Starts:

* ``probe``: the pretrained encoder with the head of the linear probe (the default profile's
  ``head_init: probe``), BatchNorm in training mode;
* ``frozen-bn``: the same, with the encoder's BatchNorm layers kept in evaluation mode;
* ``random``: the pretrained encoder with a new random head (the paper's fine-tuning);
* ``scratch``: a network from scratch (the supervised baseline).

Needs the profile's pretraining, splits and mock (``make book`` makes them).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from photoz_recipes import photoz_inputs  # benchmarks/, beside this script

from sdsscl import downstream as ds
from sdsscl.augment import AugmentationPipeline
from sdsscl.config import load_profile, parse_override
from sdsscl.metrics import photoz_metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="default")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--start", choices=("probe", "frozen-bn", "random", "scratch"), default="probe")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3, help="head learning rate (Adam)")
    ap.add_argument("--encoder-lr-factor", type=float, default=0.1)
    ap.add_argument("--val", type=int, default=600, help="validation galaxies scored")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    profile = load_profile(args.profile, dict(parse_override(s) for s in args.set))
    cfg = profile.photoz
    paths, task, data, _, target = photoz_inputs(profile)
    train, val = data.split_rows["train"], data.split_rows["val"][:args.val]
    ckpt = ds.moco_checkpoint(paths)

    torch.manual_seed(args.seed)
    net = ds.build_network(profile.pretrain.encoder, task.n_outputs, None if args.start == "scratch" else ckpt)
    if args.start in ("probe", "frozen-bn"):
        features = ds.representations_of(ckpt, profile.pretrain.encoder, data.images, profile.augment.crop_size)
        _, info = ds.fit_probe(features[train], target[train], features[val], target[val], task, cfg.probe,
                               args.seed)
        with torch.no_grad():
            net.head.weight.copy_(info["weight"])
            net.head.bias.copy_(info["bias"])

    def val_sigma() -> float:
        pred = ds.predict(net, task, data.images, val, crop_size=profile.augment.crop_size)
        return photoz_metrics(task.bins.expected(pred), task.bins.centers[target[val]])["sigma_mad"]

    print(f"profile {profile.run_name}, start {args.start}, head lr {args.lr:g}, encoder x{args.encoder_lr_factor:g}, "
          f"{args.steps} steps; {len(train)} training and {len(val)} validation galaxies")
    print(f"{'step':>5s} {'loss':>7s} {'val sigma_MAD':>14s} {'seconds':>8s}")
    print(f"{0:5d} {'':>7s} {val_sigma():14.4f} {0:8.0f}")
    enc_lr = args.lr * args.encoder_lr_factor
    opt = torch.optim.Adam([{"params": list(net.encoder.parameters()), "lr": enc_lr},
                            {"params": list(net.head.parameters()), "lr": args.lr}])
    pipeline = AugmentationPipeline(ds.TRAINING_AUGMENTATIONS, crop_size=profile.augment.crop_size)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        net.train()
        if args.start == "frozen-bn":
            for m in net.encoder.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        rows = train[rng.choice(len(train), min(128, len(train)), replace=False)]
        loss = task.loss(net(pipeline(data.images[rows], generator)), torch.as_tensor(target[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            print(f"{step:5d} {float(loss.detach()):7.3f} {val_sigma():14.4f} {time.perf_counter() - t0:8.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
