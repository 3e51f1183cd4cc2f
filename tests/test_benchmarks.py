"""The benchmark scripts: the augmentation reference does the authors' work, and every script
runs with tiny settings (no timing is asserted: benchmarks report speed, tests do not)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdsscl.constants import CROP_SIZE, CUTOUT_SIZE, R_SF11

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_augment():
    return load("bench_augment")


def test_augmentation_reference_reddens_blurs_rotates_crops_and_adds_the_drawn_noise(bench_augment):
    # The per-image reference is what sdsscl is compared with, so it must do the same work:
    # a centred source keeps its flux through blur, rotation and crop, dimmed by exactly the
    # reddening it drew, and the noise has the drawn level times the MAD in each band.
    size, c = CUTOUT_SIZE, CUTOUT_SIZE // 2
    yy, xx = np.mgrid[0:size, 0:size] - c
    source = np.exp(-(xx**2 + yy**2) / (2 * 3.0**2))                        # sigma 3 px, centred
    img = np.stack([source * (b + 1) for b in range(5)]).astype(np.float32)   # (5, 107, 107)
    for psf in (False, True):
        view = bench_augment.reference_view(img, np.random.default_rng(5), np.zeros(5), psf)
        assert view.shape == (5, CROP_SIZE, CROP_SIZE) and view.dtype == np.float32
        ebv = np.random.default_rng(5).uniform(0, 0.5)                   # the first draw
        expected = img.sum(axis=(1, 2)) * 10 ** (-0.4 * R_SF11 * ebv)
        np.testing.assert_allclose(view.sum(axis=(1, 2)), expected, rtol=2e-3)
        assert view.max() < img.max()                                   # resampled, dimmed
    mad = np.array([0.04, 0.02, 0.03, 0.05, 0.2])
    view = bench_augment.reference_view(np.zeros_like(img), np.random.default_rng(6), mad, psf=False)
    rng = np.random.default_rng(6)
    rng.uniform(0, 0.5), rng.uniform(0, 360), rng.integers(-7, 8), rng.integers(-7, 8)
    level = rng.uniform(1, 3)                                            # drawn after the geometry
    np.testing.assert_allclose(view.std(axis=(1, 2)), level * mad, rtol=0.05)


def test_bench_augment_reports_both_pipelines_side_by_side(bench_augment, capsys):
    bench_augment.main(["--batch-size", "8", "--repeats", "1", "--warmup", "1", "--ref-images", "2",
                        "--rounds", "2"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("best set", "all five"))]
    assert [r.split()[0] for r in rows] == ["best", "all"]
    for row in rows:          # label, draws, B, views/s (median, best) x 2, ratio (median, best)
        fields = row.split()
        assert fields[-8:-6] == ["cpu", "8"]
        assert all(f.endswith("x") and float(f.rstrip("x")) > 0 for f in fields[-2:])
    assert "torch threads" in out and "reference" in out
    with pytest.raises(SystemExit):                                      # GPU draws need a GPU
        bench_augment.main(["--draws", "device"])
    # Each timed round follows its own reference pass (the ratio pairs them).
    events = []
    views = bench_augment.TwoViews(bench_augment.AugmentationPipeline(("rotate",)))
    batch = torch.zeros(2, 5, CUTOUT_SIZE, CUTOUT_SIZE)
    times = bench_augment.time_torch(_Counting(views, events), batch, repeats=2, warmup=1, seed=0, rounds=3,
                                     before_round=lambda: events.append("ref"))
    assert len(times) == 3 and events == ["call"] + ["ref", "call", "call", "call"] * 3


def test_bench_augment_ratio_is_the_median_of_paired_rounds(bench_augment, capsys, monkeypatch):
    # Rounds of 8 images and reference passes of 2 images, timed as below: paired ratios
    # 40, 50 and 40 (median 40), while the ratio of the medians would be 100 / 2 = 50.
    ref_seconds, our_seconds = iter([1.0, 2.0, 4.0] * 2), [0.1, 0.16, 0.4]

    def fake_time_torch(views, batch, repeats, warmup, seed, rounds, draw_on_device, before_round):
        for _ in range(rounds):
            before_round()
        return our_seconds

    monkeypatch.setattr(bench_augment, "reference_pass", lambda *args: next(ref_seconds))
    monkeypatch.setattr(bench_augment, "time_torch", fake_time_torch)
    bench_augment.main(["--batch-size", "8", "--ref-images", "2", "--rounds", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("best", "all"))]
    assert len(rows) == 2
    for fields in rows:               # views/s (median, best) x 2, ratio (median, best)
        assert fields[-6:] == ["100", "160", "2", "4", "40.0x", "40.0x"]


class _Counting:
    """A stand-in for TwoViews that records its calls."""

    def __init__(self, views, events):
        self.views, self.events = views, events

    def __call__(self, batch, generator):
        self.events.append("call")
        return self.views(batch, generator)


def test_the_other_benchmarks_run_with_tiny_settings(capsys):
    load("bench_pretrain").main(["--profile", "smoke", "--steps", "1", "--warmup", "1"])
    assert "images/s" in capsys.readouterr().out
    load("bench_search").main(["--n", "2000", "--dim", "16", "--clusters", "10", "--queries", "20",
                               "--single", "3", "--nprobe", "1", "--ef-search", "16",
                               "--extract-batches", "0"])
    out = capsys.readouterr().out
    assert "faiss flat" in out and "faiss ivf" in out and "faiss hnsw" in out
    load("bench_mock").main(["--n", "8", "--workers", "1"])
    assert capsys.readouterr().out.strip()
