"""Training machinery shared by pretraining and the downstream tasks, and MoCo pretraining.

One process or many: launched by ``torchrun`` the environment names the rank and world size
and a process group is initialised (NCCL on GPUs, gloo on CPUs); launched plainly, everything
runs in one process. Augmentations run on the training device on whole batches
(:mod:`sdsscl.augment`), so the data loader only reads HDF5.

Checkpoints are written atomically every ``checkpoint_every`` steps and at each epoch end. They
hold both encoders and the queue (the authors' MoCo layout, ``state_dict`` with
``module.encoder_q.*``), the optimizer, the step and epoch, the gradient scaler and every random
state, so that ``resume=True`` continues a killed run exactly: on the CPU, a run killed and
resumed ends with the same weights as one never interrupted.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .augment import AugmentationPipeline, TwoViews
from .checkpoint import CheckpointError, load_safe, save_atomic
from .data import SurveyDataset, band_mad
from .config import AugmentConfig, PretrainConfig
from .moco import MoCo, check_queue_size

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistEnv:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and join the process group.

    Without those variables (a plain ``python`` launch) this is a single process. The device is
    ``cuda:LOCAL_RANK`` when CUDA is available (unless ``device`` says otherwise), else the CPU;
    ``device="cuda"`` without an index also means ``cuda:LOCAL_RANK``, so that
    ``torchrun ... --device cuda`` puts each rank on its own GPU. The backend is NCCL on GPUs and
    gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:          # "cuda": this process's own GPU
        dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def main_first(env: DistEnv, fn):
    """Run ``fn`` on rank 0, then (after a barrier) on the other ranks: for work that rank 0
    does once and caches on disk (the mock, the band MAD) and the others then only read."""
    if env.is_main:
        out = fn()
    barrier(env)
    if not env.is_main:
        out = fn()
    return out


class ResumableSampler(Sampler[int]):
    """A DistributedSampler that can start an epoch part-way through (exact resume)."""

    def __init__(self, dataset, env: DistEnv, seed: int, batch_size: int):
        self.inner = DistributedSampler(dataset, num_replicas=env.world_size, rank=env.rank,
                                        shuffle=True, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip_batches = skip_batches

    def __iter__(self) -> Iterator[int]:
        idx = list(self.inner)
        n = len(idx) // self.batch_size * self.batch_size  # whole batches only
        return iter(idx[self.skip_batches * self.batch_size:n])

    def __len__(self) -> int:
        return (len(self.inner) // self.batch_size - self.skip_batches) * self.batch_size

    def batches_per_epoch(self) -> int:
        return len(self.inner) // self.batch_size


# ----------------------------------------------------------------------------- schedule, RNG
def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine decay from base_lr to 0 over total_steps (paper Appendix E.1, MoCo v2)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def rng_state(generator: torch.Generator) -> dict:
    """Every random state a run depends on, as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(env: DistEnv, generator: torch.Generator) -> list[dict]:
    """Every process's random states (rank order), for a checkpoint that resumes each rank exactly."""
    states = [rng_state(generator)]
    if env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, states[0])
        states = gathered
    return states


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32),
                         state["numpy_pos"], 0, 0.0))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- logging
class RunLogger:
    """Rank 0 writes metrics to ``log.csv`` and TensorBoard under the run folder."""

    def __init__(self, out_dir: Path, enabled: bool, fields: tuple[str, ...]):
        self.enabled = enabled
        self.fields = ("step", "epoch") + fields
        self.csv_path = out_dir / "log.csv"
        self.tb = None
        if enabled:
            new = not self.csv_path.exists()
            self._fh = open(self.csv_path, "a", newline="")
            self._w = csv.writer(self._fh)
            if new:
                self._w.writerow(self.fields)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:  # tensorboard is in requirements.txt; keep training without it
                log.warning("tensorboard is not installed: logging to CSV only")

    def write(self, step: int, epoch: int, **values) -> None:
        if not self.enabled:
            return
        self._w.writerow([step, epoch] + [f"{values[k]:.6g}" for k in self.fields[2:]])
        self._fh.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again)."""
        if not (self.enabled and self.csv_path.exists()):
            return
        self._fh.close()
        with open(self.csv_path, newline="") as fh:
            rows = list(csv.reader(fh))
        keep = [rows[0]] + [r for r in rows[1:] if int(r[0]) <= step]
        with open(self.csv_path, "w", newline="") as fh:
            csv.writer(fh).writerows(keep)
        self._fh = open(self.csv_path, "a", newline="")
        self._w = csv.writer(self._fh)

    def close(self) -> None:
        if self.enabled:
            self._fh.close()
            if self.tb is not None:
                self.tb.close()


# ----------------------------------------------------------------------------- pretraining
_SPEED_ONLY = ("checkpoint_every", "log_every", "num_workers")


def _result_settings(cfg: PretrainConfig, augment: AugmentConfig) -> dict:
    """The settings that change what a run computes (not how fast)."""
    p = {k: v for k, v in cfg.to_dict().items() if k not in _SPEED_ONLY}
    return {"pretrain": p, "augment": json.loads(json.dumps(asdict(augment)))}


def same_run(ckpt: dict, cfg: PretrainConfig, augment: AugmentConfig, data: str | None = None,
             mad=None) -> bool:
    """Whether a checkpoint was written with these settings (speed-only ones aside) and, when
    given, on the same data (``SurveyDataset.fingerprint``) with the same noise scale (MAD).
    A checkpoint from before the data were recorded is taken to match them (logged)."""
    saved = ckpt.get("config", {})
    mine = _result_settings(cfg, augment)
    theirs = {"pretrain": {k: v for k, v in saved.get("pretrain", {}).items() if k not in _SPEED_ONLY},
              "augment": saved.get("augment")}
    if json.loads(json.dumps(theirs)) != json.loads(json.dumps(mine)):
        return False
    if data is not None:
        if "data_fingerprint" not in saved:
            log.info("the checkpoint predates data fingerprints; taking it to be of the same data")
        elif saved["data_fingerprint"] != data:
            return False
    if mad is not None and "mad" in saved and [float(v) for v in saved["mad"]] != [float(v) for v in mad]:
        return False
    return True


def _collate_images(items):
    return torch.stack([it["image"] for it in items])


def augmentation_pipeline(augment: AugmentConfig, mad, names=None) -> AugmentationPipeline:
    """The single-view pipeline of a profile's ``augment`` section (``names`` overrides the set)."""
    return AugmentationPipeline(
        augment.enabled if names is None else names, mad=torch.as_tensor(mad, dtype=torch.float32),
        max_ebv=augment.max_ebv, psf_sigma_r_arcsec=augment.psf_sigma_r_arcsec,
        psf_wavelength_power=augment.psf_wavelength_power, crop_size=augment.crop_size,
        max_jitter=augment.max_jitter, noise_scale_min=augment.noise_scale_min,
        noise_scale_max=augment.noise_scale_max)


def pretrain(cfg: PretrainConfig, augment: AugmentConfig, data, out_dir, mad=None,
             resume: bool | str = False, device: str | None = None, max_steps: int | None = None,
             progress: bool = True) -> Path:
    """Pretrain MoCo v2 on the galaxies of ``data`` (a path, glob or list of HDF5 files).

    ``mad`` is the per-band median absolute deviation of the training images that scales the
    noise augmentation (:func:`sdsscl.data.band_mad`); if None it is computed here over up to
    10,000 galaxies and cached in ``out_dir``. Writes ``checkpoint.pth.tar`` (the latest),
    ``log.csv``, ``tensorboard/`` and ``config.json`` into ``out_dir`` and returns the
    checkpoint's path. ``resume=True`` continues the run in ``out_dir`` exactly where its last
    checkpoint left it (a finished run stays as it is); ``"auto"`` does so when that checkpoint
    was written with these settings and starts afresh otherwise. ``max_steps`` stops after that
    many optimizer steps in total, after writing a checkpoint (as a kill right after one would).
    """
    env = init_distributed(device)
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "checkpoint.pth.tar"
    global_batch = cfg.batch_size * env.world_size
    check_queue_size(cfg.queue_size, global_batch)
    dataset = SurveyDataset(data)  # validates the files before anything else happens
    if len(dataset) < global_batch:
        raise ValueError(f"{len(dataset)} galaxies in {data} cannot fill one global batch of "
                         f"{global_batch}")
    if resume and not ckpt_path.exists() and resume != "auto":
        raise CheckpointError(f"--resume: no checkpoint at {ckpt_path}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if mad is None:  # computed once (rank 0) and cached for the other ranks and for resumes
        mad = main_first(env, lambda: band_mad(dataset, max_galaxies=10000, seed=cfg.seed,
                                               cache=out_dir / "band_mad.json"))
    mad = [float(v) for v in mad]
    fingerprint = dataset.fingerprint()       # the data a checkpoint was trained on
    ck = load_safe(ckpt_path, map_location="cpu") if resume and ckpt_path.exists() else None  # read once
    if resume == "auto":  # continue this run if its checkpoint exists, else start afresh
        resume = ck is not None and same_run(ck, cfg, augment, fingerprint, mad)
        if ck is not None and not resume:
            log.info("%s was written with other settings or data; starting afresh", ckpt_path)
    barrier(env)
    if not resume and env.is_main:  # a fresh run replaces an earlier one's log
        for stale in (out_dir / "log.csv", ckpt_path):
            stale.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    barrier(env)

    torch.manual_seed(cfg.seed)
    model = MoCo(cfg.encoder, queue_size=cfg.queue_size, key_momentum=cfg.key_momentum,
                 temperature=cfg.temperature, key_bn_splits=cfg.key_bn_splits,
                 generator_seed=cfg.seed).to(env.device)
    cuda = env.device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    net = model
    if env.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if cuda else None)
    lr0 = cfg.base_lr * global_batch / 256
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr0,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    views = TwoViews(augmentation_pipeline(augment, mad))
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + env.rank)

    sampler = ResumableSampler(dataset, env, cfg.seed, cfg.batch_size)
    steps_per_epoch = sampler.batches_per_epoch()
    total_steps = cfg.epochs * steps_per_epoch
    step, start_epoch = 0, 0
    logger = RunLogger(out_dir, env.is_main, ("loss", "top1", "lr", "images_per_s"))
    if resume:
        if not same_run(ck, cfg, augment, fingerprint, mad):
            raise CheckpointError(
                f"{ckpt_path} was written by a run with other settings or data "
                f"({ck.get('config')}; these data: fingerprint {fingerprint}, MAD {mad}); resume it "
                f"with its own settings and data, or start afresh without --resume (which replaces it)")
        model.load_state_dict({k.removeprefix("module."): v for k, v in ck["state_dict"].items()})
        opt.load_state_dict(ck["optimizer"])
        step, start_epoch = int(ck["step"]), int(ck["epoch"])
        set_rng_state(ck["rng"][env.rank] if env.rank < len(ck["rng"]) else ck["rng"][0], generator)
        logger.truncate_after(step)
        log.info("resumed from %s at step %d (epoch %d)", ckpt_path, step, start_epoch)
    ck = None                                   # not held in memory while training
    if env.is_main:
        tmp = out_dir / ".config.json.tmp"
        tmp.write_text(json.dumps({"pretrain": cfg.to_dict(), "augment": asdict(augment),
                                   "mad": mad, "data": str(data), "data_fingerprint": fingerprint,
                                   "world_size": env.world_size, "global_batch": global_batch,
                                   "lr": lr0, "steps_per_epoch": steps_per_epoch}, indent=1))
        os.replace(tmp, out_dir / "config.json")

    def save(epoch_for_resume: int) -> None:
        states = gather_rng_states(env, generator)
        if env.is_main:
            save_atomic({
                "epoch": epoch_for_resume, "step": step, "arch": cfg.encoder.arch,
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "rng": states,
                "config": {"pretrain": cfg.to_dict(), "augment": asdict(augment),
                           "data_fingerprint": fingerprint, "mad": mad},
            }, ckpt_path)

    # bfloat16 encoders on GPUs; the InfoNCE similarities stay float32 (moco.info_nce_loss)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", desc="MoCo pretraining")
    stop = False
    t_last, n_last = time.perf_counter(), 0
    for epoch in range(start_epoch, cfg.epochs):
        skip = step - epoch * steps_per_epoch
        sampler.set_epoch(epoch, skip_batches=skip)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                            num_workers=cfg.num_workers, collate_fn=_collate_images,
                            pin_memory=cuda, drop_last=True,
                            persistent_workers=False)
        net.train()
        for images in loader:
            images = images.to(env.device, non_blocking=True)
            im_q, im_k = views(images, generator)  # (B, 5, 64, 64) each
            if cuda:
                im_q = im_q.contiguous(memory_format=torch.channels_last)
                im_k = im_k.contiguous(memory_format=torch.channels_last)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr0, step, total_steps)
            with amp:
                loss, logits = net(im_q, im_k, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            n_last += images.shape[0] * env.world_size
            if step % cfg.log_every == 0 or step == total_steps:
                top1 = (logits.argmax(dim=1) == 0).float().mean().item()
                now = time.perf_counter()
                logger.write(step, epoch, loss=loss.item(), top1=top1, lr=opt.param_groups[0]["lr"],
                             images_per_s=n_last / max(now - t_last, 1e-9))
                t_last, n_last = now, 0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            end_of_epoch = step == (epoch + 1) * steps_per_epoch
            if step % cfg.checkpoint_every == 0 or end_of_epoch or step == max_steps:
                save(epoch + 1 if end_of_epoch else epoch)
            if max_steps is not None and step >= max_steps:
                stop = True
                break
        if stop:
            break
    if bar is not None:
        bar.close()
    logger.close()
    barrier(env)
    return ckpt_path


def prepare_run(profile, runs_dir=None, device: str | None = None, progress: bool = True):
    """A profile's run folder and this process's place in it: joins the process group, and
    on rank 0 makes sure the mock survey is there (the other ranks wait). Returns (paths, env)."""
    from .provenance import ensure_mock, run_paths

    paths = run_paths(profile, runs_dir)
    env = init_distributed(device)
    if profile.mock is not None and env.is_main:
        ensure_mock(profile, paths, progress=progress)
    barrier(env)
    return paths, env


def run_pretraining(profile, runs_dir=None, resume: bool | str = False, device: str | None = None,
                    max_steps: int | None = None, progress: bool = True) -> Path:
    """Pretrain with a profile's settings on its data, into ``runs/<profile>/checkpoints/moco``.

    The entry point behind ``scripts/pretrain.py`` and the pretraining chapter: the data are
    the profile's unlabelled and labelled files (the mock holds both), the noise scale is the
    run's cached per-band MAD.
    """
    from .provenance import data_files, training_mad

    paths, env = prepare_run(profile, runs_dir, device, progress)
    files = data_files(profile, paths)
    survey = sorted(set(files["unlabelled"]) | set(files["labelled"]))
    mad = main_first(env, lambda: training_mad(profile, paths, SurveyDataset(survey)))
    return pretrain(profile.pretrain, profile.augment, survey, paths.checkpoints / "moco", mad=mad,
                    resume=resume, device=device, max_steps=max_steps, progress=progress)
