"""Downstream training: the two learning rates, LBFGS probe, exact resume, the sweeps on a
tiny mock run end to end, bad input."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from sdsscl import downstream as ds
from sdsscl.checkpoint import load_safe
from sdsscl.config import EncoderConfig, ProbeConfig, ScheduleConfig, load_profile
from sdsscl.data import SurveyDataset, has_specz, make_splits, save_splits
from sdsscl.mock import generate_mock
from sdsscl.models import build_encoder
from sdsscl.provenance import read_metrics, run_paths
from sdsscl.train import run_pretraining

TINY = EncoderConfig(arch="resnet18", stem_stride=2, width=4, projection_dim=8)
AUGMENT = load_profile("smoke").augment


def schedule(**kw) -> ScheduleConfig:
    base = dict(optimizer="sgd", lr=0.05, encoder_lr_factor=0.1, weight_decay=0.0, epochs=1, min_steps=6,
                max_steps=6, milestones=(0.5,), batch_size=8)
    base.update(kw)
    return ScheduleConfig(**base)


def test_finetuning_trains_pretrained_weights_at_a_tenth_of_the_head_rate():
    net = ds.Network(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)), 3, 1)
    for pretrained, factor in ((True, 0.1), (False, 1.0)):
        opt = ds.make_optimizer(net, schedule(optimizer="adam", lr=1e-3), pretrained=pretrained)
        enc, head = opt.param_groups
        assert head["lr"] == pytest.approx(1e-3) and enc["lr"] == pytest.approx(1e-3 * factor)
        assert {id(p) for p in enc["params"]} == {id(p) for p in net.encoder.parameters()}
    # one SGD step on a shared gradient: the encoder's weights move 10x less than the head's would
    net.zero_grad()
    w_enc, w_head = net.encoder[1].weight.detach().clone(), net.head.weight.detach().clone()
    opt = ds.make_optimizer(net, schedule(lr=0.5, encoder_lr_factor=0.1), pretrained=True)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert torch.allclose(w_enc - net.encoder[1].weight, torch.full_like(w_enc, 0.05))
    assert torch.allclose(w_head - net.head.weight, torch.full_like(w_head, 0.5))


def test_step_schedule_and_step_budget():
    assert [ds.step_lr_factor(s, 100, (0.6, 0.9)) for s in (0, 59, 60, 89, 90, 99)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    sched = schedule(epochs=3, min_steps=10, max_steps=None, batch_size=8)
    assert ds.total_steps(sched, 8) == 10          # 3 epochs of 1 step -> at least 10
    assert ds.total_steps(sched, 80) == 30         # 3 epochs of 10 steps
    assert ds.total_steps(replace(sched, max_steps=12), 80) == 12
    assert ds.total_steps(sched, 80, world_size=2) == 15


def test_lbfgs_probe_separates_separable_data():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (2, 16)) * 3
    y = rng.integers(0, 2, 400)
    x = centres[y] + rng.normal(0, 1, (400, 16))
    # soft labels far from 0.5, like confident volunteers
    p = np.where(y == 1, 0.9, 0.1).astype(np.float32)
    predict, info = ds.fit_probe(x[:300], p[:300], x[300:350], p[300:350], ds.morphology_task("smooth"),
                                 ProbeConfig(lr=0.05, epochs=6, milestones=(4,), max_iter=20, weight_decay=0.0),
                                 seed=0)
    pred = predict(x[350:])
    assert ((pred >= 0.5) == (y[350:] == 1)).all()
    assert info["best_score"] == 1.0 and 1 <= info["best_epoch"] <= 6


def _toy_images(n=48, seed=0):
    """Galaxies whose label is whether the centre is bright (a signal a CNN learns in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 5, 107, 107, generator=g) * 0.1
    label = torch.arange(n) % 2
    images[label == 1, :, 43:64, 43:64] += 2.0
    return ds.Images(images), label.float().numpy()


def test_killed_and_resumed_fit_equals_uninterrupted(tmp_path):
    images, p = _toy_images()
    task = ds.morphology_task("smooth")
    rows = np.arange(32)
    args = (task, images, rows, p[rows], np.arange(32, 48), p[32:48], schedule(), AUGMENT)

    def run(out, **kw):
        torch.manual_seed(0)
        net = ds.Network(build_encoder(TINY), 32, 1)
        return ds.fit(net, *args, pretrained=False, seed=4, out_dir=out, **kw)

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", max_steps=4)  # killed after step 4's checkpoint
    assert load_safe(tmp_path / "cut" / "checkpoint.pth.tar")["step"] == 4
    resumed = run(tmp_path / "cut")
    for (k, a), b in zip(whole.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert whole.best_step == resumed.best_step and whole.history == resumed.history
    with open(tmp_path / "cut" / "log.csv") as fh:  # no row logged twice
        steps = [int(line.split(",")[0]) for line in fh.readlines()[1:]]
    assert steps == sorted(set(steps))


def test_images_read_from_files_through_workers_train_the_same_network(tmp_path):
    # Sets too large for memory are read from the survey files by DataLoader workers: the
    # batches, and so the trained weights, are those of the in-memory run.
    import h5py

    from sdsscl.data import SurveyDataset

    images, p = _toy_images()
    n = len(images)
    path = tmp_path / "labelled.h5"
    with h5py.File(path, "w") as f:
        f["images"] = images.source.numpy()
        f["e_bv"] = np.zeros((n, 5), np.float32)
        f["ra"], f["dec"] = np.zeros(n), np.zeros(n)
        f["ObjID"] = 1237648720693755904 + np.arange(n, dtype=np.int64)
        f["specObjID"] = np.full(n, -1, np.int64)
        f["specz_redshift"] = f["specz_redshift_err"] = np.full(n, np.nan)
    task = ds.morphology_task("smooth")
    args = (task, np.arange(32), p[:32], np.arange(32, 48), p[32:48], schedule(), AUGMENT)

    def run(source, workers):
        torch.manual_seed(0)
        net = ds.Network(build_encoder(TINY), 32, 1)
        return ds.fit(net, args[0], source, *args[1:], pretrained=False, seed=4, num_workers=workers)

    in_memory = run(images, 0)
    from_files = run(ds.Images(SurveyDataset(path)), 2)
    for (k, a), b in zip(in_memory.net.state_dict().items(), from_files.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert in_memory.history == from_files.history


def test_label_subsets_are_nested_and_refuse_too_many():
    a = ds.label_subset(100, 10, seed=1, split_seed=5)
    b = ds.label_subset(100, 40, seed=1, split_seed=5)
    assert set(a) <= set(b) and len(set(b)) == 40
    assert not np.array_equal(a, ds.label_subset(100, 10, seed=2, split_seed=5))
    with pytest.raises(ValueError, match="asked for 101 training labels but only 100"):
        ds.label_subset(100, 101, seed=0, split_seed=5)
    points, skipped = ds.sweep_points((16, 64, 256), n_train=100, repeats=3, repeat_up_to=16)
    assert points == [(16, 0), (16, 1), (16, 2), (64, 0), (100, 0)] and skipped == [256]


def test_labels_outside_the_task_are_refused():
    images, p = _toy_images(8)
    task = ds.morphology_task("smooth")
    net = ds.Network(build_encoder(TINY), 32, 1)
    bad = p.copy()
    bad[2] = 1.5
    with pytest.raises(ValueError, match=r"1 of 6 training labels are not vote fractions in \[0, 1\], e.g. 1.5"):
        ds.fit(net, task, images, np.arange(6), bad[:6], np.arange(6, 8), p[6:], schedule(), AUGMENT,
               pretrained=False, seed=0)
    bins = ds.photoz_task(180, 0.4)
    with pytest.raises(ValueError, match=r"validation labels are not bin indices in \[0, 180\)"):
        ds.fit(ds.Network(build_encoder(TINY), 32, 180), bins, images, np.arange(6), np.zeros(6, int),
               np.arange(6, 8), np.array([3, 180]), schedule(), AUGMENT, pretrained=False, seed=0)


def test_unknown_question_is_refused():
    with pytest.raises(KeyError, match="unknown GZ2 question 'spiral'"):
        ds.morphology_task("spiral")


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A smoke-profile run on a 160-galaxy mock with splits and a few MoCo steps."""
    runs = tmp_path_factory.mktemp("runs")
    prof = load_profile("smoke", {"mock.n_galaxies": 160, "pretrain.epochs": 1,
                                  "morphology.label_counts": [8], "morphology.repeats": 2,
                                  "morphology.repeat_up_to": 8, "photoz.fractions": [0.5, 1.0]})
    paths = run_paths(prof, runs)
    paths.root.mkdir(parents=True)
    generate_mock(paths.mock, n=160, seed=prof.mock.seed, workers=1, progress=False)
    survey = SurveyDataset(paths.mock)
    labelled = survey.subset(has_specz(survey))
    save_splits(make_splits(labelled.objids, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=1), paths.splits,
                seed=1, fractions={"train": 0.7, "val": 0.1, "test": 0.2})
    run_pretraining(prof, runs, progress=False)
    return prof, runs, paths


def test_morphology_sweep_end_to_end_and_reuses_finished_runs(tiny_run):
    prof, runs, paths = tiny_run
    out = ds.run_morphology(prof, runs, progress=False)
    keys = {(r["question"], r["model"], r["count"], r["seed"]) for r in out["runs"]}
    for q in prof.morphology.questions:
        n_train = out["n_labelled"][q]["train"]
        for model in ds.MODELS:
            assert (q, model, n_train, 0) in keys
            if n_train > 8:
                assert {(q, model, 8, 0), (q, model, 8, 1)} <= keys
    rec = out["runs"][0]
    store = paths.root / "downstream" / "morphology"
    arrays = np.load(store / f"{rec['question']}/{rec['model']}/n{rec['count']}-s{rec['seed']}.npz")
    assert ((arrays["p_true"] >= 0) & (arrays["p_true"] <= 1)).all()
    assert arrays["p_pred"].shape == arrays["p_true"].shape
    assert not [f for f in (store / "work").rglob("*") if f.is_file()]  # checkpoints removed once done
    assert read_metrics("morphology", paths)["runs"][0]["metrics"] == rec["metrics"]
    # a second call trains nothing: same records, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in store.rglob("*.json")}
    again = ds.run_morphology(prof, runs, progress=False)
    assert json.dumps(again["runs"]) == json.dumps(out["runs"])  # (NaN metrics compare as text)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*.json")} == mtimes


def test_photoz_sweep_end_to_end(tiny_run):
    prof, runs, paths = tiny_run
    out = ds.run_photoz(prof, runs, progress=False)
    models = {(r["model"], r["fraction"]) for r in out["runs"]}
    assert models == {(m, f) for m in ("supervised", "finetune") for f in (0.5, 1.0)}
    for r in out["runs"]:
        m = r["metrics"]
        assert m["sigma_mad"] >= 0 and 0 <= m["eta"] <= 1 and m["crps"] > 0
    assert [r["fraction"] for r in out["photometry_reference"]] == [0.5, 1.0]
    z = np.load(paths.root / "downstream" / "photoz" / "finetune" / "f1-s0.npz")
    assert z["pz"].shape == (len(z["z_spec"]), prof.photoz.bins)
    assert np.allclose(z["pz"].astype(np.float32).sum(1), 1, atol=1e-2)
    assert ((z["pit"] >= 0) & (z["pit"] <= 1)).all()
    assert json.loads((paths.metric("photoz")).read_text())["metrics"]["n_test"] == len(z["z_spec"])


def test_photoz_refuses_a_labelled_set_without_redshifts(tiny_run, monkeypatch):
    prof, runs, _ = tiny_run
    real = SurveyDataset.column

    def no_z(self, name):
        col = real(self, name)
        if name == "specz_redshift":
            col = col.copy()
            col[3] = np.nan
        return col

    monkeypatch.setattr(SurveyDataset, "column", no_z)
    with pytest.raises(ValueError, match="1 labelled galaxies have no valid spectroscopic redshift"):
        ds.run_photoz(prof, runs, progress=False)


def test_missing_pretraining_is_a_clear_error(tmp_path):
    prof = load_profile("smoke")
    with pytest.raises(FileNotFoundError, match="no pretrained encoder"):
        ds.moco_checkpoint(run_paths(prof, tmp_path))



def _ddp_fit_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    images, p = _toy_images()
    torch.manual_seed(0)
    net = ds.Network(build_encoder(TINY), 32, 1)
    res = ds.fit(net, ds.morphology_task("smooth"), images, np.arange(32), p[:32], np.arange(32, 48), p[32:48],
                 schedule(batch_size=4), AUGMENT, pretrained=False, seed=4, out_dir=out, device="cpu")
    torch.save({k: v.clone() for k, v in res.net.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_process_gloo_fit_keeps_ranks_in_step(tmp_path, free_port):
    """Under torchrun every process trains on its share of each global batch and keeps the
    same weights; the checkpoint records both ranks' random states."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_fit_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ck = load_safe(tmp_path / "checkpoint.pth.tar")
    assert ck["step"] == 6 and len(ck["rng"]) == 2


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_fit_on_cuda_learns_and_resumes(tmp_path):
    """The downstream loop on a GPU (bf16 autocast): it learns the toy signal, and a killed run
    resumes to the same number of steps."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    images, p = _toy_images(96)
    task = ds.morphology_task("smooth")
    args = (task, images, np.arange(64), p[:64], np.arange(64, 96), p[64:96],
            schedule(min_steps=30, max_steps=30, lr=0.05), AUGMENT)

    def run(out, **kw):
        torch.manual_seed(0)
        return ds.fit(ds.Network(build_encoder(TINY), 32, 1), *args, pretrained=False, seed=4, out_dir=out,
                      device="cuda", **kw)

    whole = run(tmp_path / "whole")
    assert next(whole.net.parameters()).device.type == "cuda"
    pred = ds.predict(whole.net, task, images, np.arange(64, 96))
    assert ((np.asarray(pred) >= 0.5) == (p[64:96] >= 0.5)).mean() >= 0.9
    run(tmp_path / "cut", max_steps=10)
    assert load_safe(tmp_path / "cut" / "checkpoint.pth.tar")["step"] == 10
    assert run(tmp_path / "cut").steps == whole.steps == 30
