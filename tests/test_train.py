"""MoCo pretraining: a few steps lower the loss, exact resume, 2-process gloo DDP, bad input."""
from __future__ import annotations

import csv
import os
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from sdsscl.checkpoint import CheckpointError, load_encoder, load_safe
from sdsscl.data import DataFormatError
from sdsscl.mock import generate_mock
from sdsscl.config import ConfigError, EncoderConfig, PretrainConfig, load_profile
from sdsscl.train import cosine_lr
from sdsscl.train import pretrain as _pretrain

TINY = EncoderConfig(arch="resnet18", stem_stride=2, width=8, projection_dim=16)
AUGMENT = load_profile("smoke").augment  # the paper's settings, all but PSF


def tiny_cfg(**kw) -> PretrainConfig:
    base = dict(encoder=TINY, epochs=2, batch_size=8, queue_size=32, base_lr=0.3, momentum=0.9,
                weight_decay=1e-4, key_momentum=0.99, temperature=0.1, key_bn_splits=2,
                checkpoint_every=3, log_every=1, num_workers=0, seed=3)
    base.update(kw)
    return PretrainConfig(**base)


def pretrain(cfg, data, out, augmentations=None, **kw):
    augment = AUGMENT if augmentations is None else replace(AUGMENT, enabled=augmentations)
    return _pretrain(cfg, augment, data, out, **kw)


@pytest.fixture(scope="module")
def mock(tmp_path_factory):
    return generate_mock(tmp_path_factory.mktemp("data") / "mock.h5", n=96, seed=1, workers=1,
                         progress=False)


def _weights(ckpt):
    return load_safe(ckpt)["state_dict"]


def test_cosine_schedule():
    assert cosine_lr(0.03, 0, 100) == pytest.approx(0.03)
    assert cosine_lr(0.03, 50, 100) == pytest.approx(0.015)
    assert cosine_lr(0.03, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_pretraining_lowers_loss_and_writes_authors_layout(mock, tmp_path):
    # geometric views only, so that a width-8 network learns visibly within 96 steps; the
    # loss starts near log(1 + K) once the queue holds real keys and must fall below it
    cfg = tiny_cfg(epochs=8, batch_size=8, queue_size=16, base_lr=1.0, key_momentum=0.99,
                   key_bn_splits=1)
    ckpt = pretrain(cfg, mock, tmp_path / "run", augmentations=("rotate", "jitter_crop"),
                    progress=False)
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(losses) == 8 * (96 // 8)
    first, last = sum(losses[2:14]) / 12, sum(losses[-24:]) / 24
    assert last < first - 0.1, (first, last)
    ck = load_safe(ckpt)
    assert any(k.startswith("module.encoder_q.") for k in ck["state_dict"])
    assert "module.queue" in ck["state_dict"] and ck["epoch"] == 8
    enc, report = load_encoder(ckpt, TINY)
    assert not report.missing
    assert (tmp_path / "run" / "tensorboard").is_dir()


def test_killed_and_resumed_equals_uninterrupted(mock, tmp_path):
    cfg = tiny_cfg(batch_size=16)  # 2 epochs x 6 steps; full augmentations
    full = pretrain(cfg, mock, tmp_path / "full", progress=False)
    part = pretrain(cfg, mock, tmp_path / "part", progress=False, max_steps=4)  # mid-epoch 1
    assert load_safe(part)["step"] == 4
    resumed = pretrain(cfg, mock, tmp_path / "part", progress=False, resume=True)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = list(csv.DictReader(open(tmp_path / "part" / "log.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))


def test_auto_resume_continues_a_run_only_on_the_same_data(mock, tmp_path, caplog):
    import shutil

    import h5py

    def steps(out):
        return [int(r["step"]) for r in csv.DictReader(open(out / "log.csv"))]

    cfg, out = tiny_cfg(batch_size=16), tmp_path / "run"
    pretrain(cfg, mock, out, progress=False, max_steps=2)
    # The same content under another name and time (a regenerated identical mock) continues.
    same = tmp_path / "same.h5"
    shutil.copy(mock, same)
    pretrain(cfg, same, out, progress=False, resume="auto", max_steps=3)
    assert steps(out) == [1, 2, 3]
    # One changed pixel of one galaxy (a generator that draws other images): a fresh run.
    changed = tmp_path / "changed.h5"
    shutil.copy(mock, changed)
    with h5py.File(changed, "r+") as f:
        f["images"][0, 2, 50, 50] += 1.0
    pretrain(cfg, changed, out, progress=False, resume="auto", max_steps=1)
    assert steps(out) == [1] and load_safe(out / "checkpoint.pth.tar")["step"] == 1
    with pytest.raises(CheckpointError, match="other settings or data"):
        pretrain(cfg, mock, out, progress=False, resume=True)
    # Another noise scale (the MAD that the noise augmentation multiplies) is another run too.
    pretrain(cfg, changed, out, progress=False, resume="auto", max_steps=2, mad=[0.01] * 5)
    assert steps(out) == [1, 2]
    pretrain(cfg, changed, out, progress=False, resume="auto", max_steps=1, mad=[0.02] * 5)
    assert steps(out) == [1]
    # A checkpoint from before the data were recorded is taken to match them (and says so).
    ck = load_safe(out / "checkpoint.pth.tar")
    del ck["config"]["data_fingerprint"], ck["config"]["mad"]
    torch.save(ck, out / "checkpoint.pth.tar")
    with caplog.at_level("INFO", logger="sdsscl.train"):
        pretrain(cfg, changed, out, progress=False, resume="auto", max_steps=2, mad=[0.02] * 5)
    assert steps(out) == [1, 2] and "predates data fingerprints" in caplog.text


def test_bad_inputs_fail_before_training(mock, tmp_path):
    with pytest.raises(ValueError, match="nearest valid K"):
        pretrain(tiny_cfg(queue_size=30), mock, tmp_path / "a", progress=False)
    with pytest.raises((DataFormatError, FileNotFoundError), match="nothing"):
        pretrain(tiny_cfg(), tmp_path / "nothing*.h5", tmp_path / "b", progress=False)
    with pytest.raises(ConfigError, match="resnet51"):
        tiny_cfg(encoder=EncoderConfig(arch="resnet51"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(tiny_cfg(), mock, tmp_path / "c", progress=False, resume=True)
    # a checkpoint of another architecture is refused before training continues
    pretrain(tiny_cfg(), mock, tmp_path / "d", progress=False, max_steps=1)
    other = tiny_cfg(encoder=EncoderConfig(arch="resnet18", stem_stride=2, width=16, projection_dim=16))
    with pytest.raises(CheckpointError, match="encoder"):
        pretrain(other, mock, tmp_path / "d", progress=False, resume=True)



def _ddp_worker(rank, world, port, mock, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    pretrain(tiny_cfg(batch_size=4, queue_size=32, epochs=1), mock, out, progress=False,
             max_steps=2, device="cpu")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_process_gloo_training_fills_queue_from_both_ranks(mock, tmp_path, free_port):
    port = free_port
    mp.spawn(_ddp_worker, args=(2, port, str(mock), str(tmp_path / "ddp")), nprocs=2, join=True)
    ck = load_safe(tmp_path / "ddp" / "checkpoint.pth.tar")
    queue = ck["state_dict"]["module.queue"]
    init = torch.nn.functional.normalize(
        torch.randn(16, 32, generator=torch.Generator().manual_seed(3)), dim=0)
    changed = (queue - init).abs().sum(0) > 1e-6
    # 2 steps x global batch 8 (2 ranks x 4) = 16 keys, in slots 0..15
    assert changed[:16].all() and not changed[16:].any()
    assert int(ck["state_dict"]["module.queue_ptr"]) == 16
    assert len(ck["rng"]) == 2  # both ranks' random states saved


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_pretraining_on_cuda_learns_resumes_and_picks_the_local_gpu(mock, tmp_path):
    """bf16 autocast and channels_last on a GPU: the same loss decrease as on the CPU, and a
    killed run resumes to the same number of steps."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from sdsscl.train import init_distributed

    assert init_distributed("cuda").device == torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cfg = tiny_cfg(epochs=8, batch_size=8, queue_size=16, base_lr=1.0, key_momentum=0.99, key_bn_splits=1)
    ckpt = pretrain(cfg, mock, tmp_path / "run", augmentations=("rotate", "jitter_crop"), progress=False,
                    device="cuda")
    losses = [float(r["loss"]) for r in csv.DictReader(open(tmp_path / "run" / "log.csv"))]
    first, last = sum(losses[2:14]) / 12, sum(losses[-24:]) / 24
    assert last < first - 0.1, (first, last)
    assert all(v.isfinite().all() for v in _weights(ckpt).values() if v.is_floating_point())
    part = pretrain(tiny_cfg(batch_size=16), mock, tmp_path / "part", progress=False, max_steps=4, device="cuda")
    assert load_safe(part)["step"] == 4
    resumed = pretrain(tiny_cfg(batch_size=16), mock, tmp_path / "part", progress=False, resume=True,
                       device="cuda")
    assert load_safe(resumed)["step"] == 12
