#!/usr/bin/env python
"""Is a pretrained encoder worth using? A quick check against the same network untrained.

    python benchmarks/probe_pretraining.py --profile default

Frozen representations (centre crop, de-reddened as for the downstream tasks) of the
labelled galaxies of the profile's mock, from the run's MoCo checkpoint and from a randomly
initialised encoder of the same architecture; then, on a fixed split of those galaxies, a
k-nearest-neighbour (cosine) probe and a linear (ridge) probe of (a) the true morphology (smooth or disk), (b) the GZ2
majority vote on the first question, and (c) the spectroscopic redshift. This is a
diagnostic for choosing the CPU profile's network and schedule, not the paper's downstream
evaluation (linear probes, fine-tuning and supervised baselines come with their own chapters).
"""
import argparse

import numpy as np
import torch

from sdsscl.augment import CenterCrop
from sdsscl.checkpoint import load_encoder
from sdsscl.config import load_profile, parse_override
from sdsscl.data import SurveyDataset, deredden, has_specz
from sdsscl.gz2 import SMOOTH
from sdsscl.models import build_encoder
from sdsscl.provenance import run_paths


@torch.no_grad()
def features(encoder, ds, batch=256):
    encoder.eval()
    crop = CenterCrop()
    out = []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(len(ds), start + batch))]
        x = torch.stack([it["image"] for it in items])
        e_bv = torch.stack([it["e_bv"] for it in items])
        out.append(torch.nn.functional.normalize(encoder(crop(deredden(x, e_bv))), dim=1))
    return torch.cat(out).numpy()


def knn_predict(train_x, train_y, test_x, k, classify):
    sim = test_x @ train_x.T
    idx = np.argpartition(-sim, k, axis=1)[:, :k]
    votes = train_y[idx]
    if classify:
        return (votes.mean(axis=1) >= 0.5).astype(int)
    return np.median(votes, axis=1)


def ridge_predict(train_x, train_y, test_x, alpha=1e-3):
    """Linear probe: ridge regression on standardised features (closed form)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-8
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    a1 = np.hstack([a, np.ones((len(a), 1))])
    w = np.linalg.solve(a1.T @ a1 + alpha * len(a) * np.eye(a1.shape[1]), a1.T @ train_y)
    return np.hstack([b, np.ones((len(b), 1))]) @ w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="default")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-galaxies", type=int, default=6000)
    ap.add_argument("--checkpoint", default=None, help="default: the profile's run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="profile override (e.g. the encoder of --checkpoint)")
    args = ap.parse_args(argv)
    cfg = load_profile(args.profile, dict(parse_override(x) for x in args.set))
    paths = run_paths(load_profile(args.profile))
    survey = SurveyDataset(paths.mock, columns=("e_bv",))
    lab = np.flatnonzero(has_specz(survey))
    rng = np.random.default_rng(0)
    lab = np.sort(rng.choice(lab, min(len(lab), args.max_galaxies), replace=False))
    ds = survey.subset(lab)
    z = ds.column("specz_redshift").astype(np.float64)
    morph = ds.column("truth/morphology").astype(int)
    votes = ds.column("gz2/smooth/votes")
    p_smooth = SMOOTH.binary_fraction(votes)
    test = rng.random(len(ds)) < 0.3

    ckpt = args.checkpoint or paths.checkpoints / "moco" / "checkpoint.pth.tar"
    trained, _ = load_encoder(ckpt, cfg.pretrain.encoder)
    torch.manual_seed(0)
    untrained = build_encoder(cfg.pretrain.encoder)
    print(f"profile {cfg.name}: {len(ds)} labelled galaxies ({test.sum()} test), kNN k={args.k}, "
          f"checkpoint {ckpt}")
    print(f"{'encoder':<12} {'probe':<7} {'morphology acc':>15} {'GZ2 Q1 acc':>11} {'z sigma_MAD':>12} {'z eta':>7}")
    for name, enc in (("untrained", untrained), ("MoCo", trained)):
        f = features(enc, ds)
        g = np.isfinite(p_smooth)
        gtr, gte = g & ~test, g & test
        acc = np.mean((ridge_predict(f[~test], morph[~test].astype(float), f[test]) >= 0.5) == morph[test])
        gacc = np.mean((ridge_predict(f[gtr], p_smooth[gtr], f[gte]) >= 0.5) == (p_smooth[gte] >= 0.5))
        dz = (ridge_predict(f[~test], z[~test], f[test]) - z[test]) / (1 + z[test])
        smad = 1.4826 * np.median(np.abs(dz - np.median(dz)))
        print(f"{name:<12} {'linear':<7} {acc:>15.3f} {gacc:>11.3f} {smad:>12.4f} {np.mean(np.abs(dz) > 0.05):>7.3f}")
        acc = np.mean(knn_predict(f[~test], morph[~test], f[test], args.k, True) == morph[test])
        g = np.isfinite(p_smooth)
        gtr, gte = g & ~test, g & test
        gacc = np.mean(knn_predict(f[gtr], (p_smooth[gtr] >= 0.5).astype(int), f[gte], args.k, True)
                       == (p_smooth[gte] >= 0.5))
        zp = knn_predict(f[~test], z[~test], f[test], args.k, False)
        dz = (zp - z[test]) / (1 + z[test])
        smad = 1.4826 * np.median(np.abs(dz - np.median(dz)))
        print(f"{name:<12} {'kNN':<7} {acc:>15.3f} {gacc:>11.3f} {smad:>12.4f} {np.mean(np.abs(dz) > 0.05):>7.3f}")


if __name__ == "__main__":
    main()
