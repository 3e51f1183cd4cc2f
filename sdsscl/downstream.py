"""Downstream tasks: GZ2 morphology (Section 3.2, Appendix C) and photometric redshifts
(Section 3.3, Appendix E.2), and the augmentation ablation (Appendix D).

Three kinds of model, as in the paper:

* ``supervised``: the encoder's architecture trained from scratch with a new linear head;
* ``finetune``: the pretrained encoder with a new linear head, the pretrained weights at a
  ``encoder_lr_factor`` (0.1) times smaller learning rate than the head;
* ``probe``: a linear classifier on the frozen representations, trained with LBFGS
  (morphology only, as in the paper).

The networks train with the machinery of :mod:`sdsscl.train` (devices, ``torchrun`` DDP,
atomic checkpoints with exact resume, CSV/TensorBoard logs): :func:`fit` is the one loop for
both tasks and both network kinds. Rotation and jitter-crop augment the training images on
the training device; evaluation uses the centre crop. The model kept is the one with the best
validation score (morphology: accuracy on high-quality labels, Appendix C.2; photo-z:
sigma_MAD), evaluated ``N_EVALS`` times per run.

Each run's result (test predictions and metrics) is a file under
``runs/<profile>/downstream/<task>/``; the runners skip runs whose result exists with the same
settings, and a killed run continues from its last checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import gz2
from .augment import AugmentationPipeline, CenterCrop
from .checkpoint import load_encoder, load_safe, save_atomic
from .config import AugmentConfig, EncoderConfig, ProbeConfig, Profile, ScheduleConfig
from .data import SurveyDataset, load_splits
from .metrics import RedshiftBins, binary_metrics, photoz_metrics
from .models import build_encoder, representation_dim
from .representations import encode
from .train import RunLogger, barrier, gather_rng_states, init_distributed, set_rng_state

log = logging.getLogger(__name__)

#: Validation evaluations per run (the best one is kept).
N_EVALS = 8
#: The augmentations of supervised and fine-tuned training (Appendix C.2, E.2).
TRAINING_AUGMENTATIONS = ("rotate", "jitter_crop")
MODELS = ("supervised", "probe", "finetune")


# ----------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """What a network predicts.

    binary: one output, a probability P (GZ2 vote fraction) learnt with binary cross-entropy
        on the soft labels (Appendix C.2).
    bins: ``n_outputs`` redshift classes learnt with cross-entropy (Pasquet et al. 2019);
        the prediction is the p(z) over the bins.
    """

    name: str
    kind: str  # "binary" or "bins"
    n_outputs: int = 1
    bins: RedshiftBins | None = None

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.kind == "binary":
            return F.binary_cross_entropy_with_logits(logits[:, 0], target.float())
        return F.cross_entropy(logits, target.long())

    def predict(self, logits: Tensor) -> Tensor:
        """P (N,) for binary tasks; p(z) (N, n_bins) for redshift bins."""
        return torch.sigmoid(logits[:, 0]) if self.kind == "binary" else torch.softmax(logits, dim=1)

    def score(self, pred: np.ndarray, target: np.ndarray) -> float:
        """Validation score, higher is better: accuracy on high-quality labels (Appendix
        C.2), or minus sigma_MAD of E(z)."""
        if self.kind == "binary":
            acc = binary_metrics(target, pred)["accuracy"]
            return -math.inf if not np.isfinite(acc) else float(acc)
        return -float(photoz_metrics(self.bins.expected(pred), self.bins.centers[target])["sigma_mad"])


def check_targets(task: Task, targets: np.ndarray, what: str) -> None:
    """Labels a task can learn: P in [0, 1] (binary), or bin indices in [0, n_bins)."""
    t = np.asarray(targets)
    if task.kind == "binary":
        bad = ~np.isfinite(t) | (t < 0) | (t > 1)
        rule = "vote fractions in [0, 1]"
    else:
        bad = (t < 0) | (t >= task.n_outputs) | (t != np.round(t))
        rule = f"bin indices in [0, {task.n_outputs})"
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{task.name}: {int(bad.sum())} of {t.size} {what} labels are not {rule}, "
                         f"e.g. {t.flat[i].item()!r} at position {i}")


def morphology_task(question: str) -> Task:
    gz2.question(question)  # KeyError naming the valid questions
    return Task(name=question, kind="binary")


def photoz_task(n_bins: int, z_max: float) -> Task:
    bins = RedshiftBins(n_bins=n_bins, z_max=z_max)
    return Task(name="photoz", kind="bins", n_outputs=n_bins, bins=bins)


# ----------------------------------------------------------------------------- images
class Images:
    """The cutouts of a labelled set, by row: held in memory (a tensor) or read from the
    survey files on demand (a :class:`SurveyDataset`, for sets too large for memory)."""

    def __init__(self, source: Tensor | SurveyDataset):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, rows) -> Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        if isinstance(self.source, Tensor):
            return self.source[torch.from_numpy(rows)]
        return torch.stack([self.source[int(r)]["image"] for r in rows])

    @classmethod
    def load(cls, dataset: SurveyDataset, batch_size: int = 256, progress: bool = False) -> "Images":
        """Read every image of ``dataset`` into memory (float32, (N, 5, 107, 107))."""
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0,
                                             collate_fn=lambda items: torch.stack([it["image"] for it in items]))
        if progress:
            from tqdm.auto import tqdm

            loader = tqdm(loader, desc="reading images", unit="batch")
        return cls(torch.cat(list(loader)) if len(dataset) else torch.zeros(0, 5, 107, 107))


# ----------------------------------------------------------------------------- networks
class Network(nn.Module):
    """An encoder with a new linear head (the paper's single fully connected layer)."""

    def __init__(self, encoder: nn.Module, dim: int, n_outputs: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))  # (B, n_outputs)


def build_network(encoder_cfg: EncoderConfig, n_outputs: int, checkpoint: Path | None = None) -> Network:
    """A network from scratch (``checkpoint`` None) or from a pretrained encoder."""
    if checkpoint is None:
        encoder = build_encoder(encoder_cfg)
    else:
        encoder, _ = load_encoder(checkpoint, encoder_cfg)
    return Network(encoder, representation_dim(encoder_cfg), n_outputs)


def make_optimizer(net: Network, schedule: ScheduleConfig, pretrained: bool) -> torch.optim.Optimizer:
    """The head trains at ``lr``; the encoder at ``lr`` too when trained from scratch, at
    ``lr x encoder_lr_factor`` when pretrained (Appendix C.2, E.2)."""
    enc_lr = schedule.lr * (schedule.encoder_lr_factor if pretrained else 1.0)
    groups = [{"params": list(net.encoder.parameters()), "lr": enc_lr, "base_lr": enc_lr},
              {"params": list(net.head.parameters()), "lr": schedule.lr, "base_lr": schedule.lr}]
    if schedule.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, weight_decay=schedule.weight_decay)
    return torch.optim.Adam(groups, weight_decay=schedule.weight_decay)


def describe_schedule(s: ScheduleConfig) -> str:
    """One line for a settings table: optimizer, learning rates, length, batch, head start."""
    return (f"{s.optimizer}, lr {s.lr:g}" + (f" (encoder x{s.encoder_lr_factor:g})" if s.encoder_lr_factor < 1 else "")
            + f", {s.epochs} epochs / {s.min_steps}-{s.max_steps or 'any'} steps, batch {s.batch_size}"
            + (", head from the linear probe" if s.head_init == "probe" else ""))


def total_steps(schedule: ScheduleConfig, n_train: int, world_size: int = 1) -> int:
    """Optimizer steps of a run: ``epochs`` passes, at least ``min_steps``, at most ``max_steps``."""
    per_epoch = max(1, math.ceil(n_train / (schedule.batch_size * world_size)))
    steps = max(schedule.epochs * per_epoch, schedule.min_steps)
    return steps if schedule.max_steps is None else min(steps, schedule.max_steps)


def step_lr_factor(step: int, total: int, milestones: Sequence[float]) -> float:
    """10x smaller after each milestone (fractions of the run; paper: 60% and 90%)."""
    return 0.1 ** sum(step >= m * total for m in milestones)


@torch.no_grad()
def predict(net: nn.Module, task: Task, images: Images, rows=None, crop_size: int = 64,
            batch_size: int = 256, num_workers: int = 0) -> np.ndarray:
    """Predictions on centre-cropped images: P (N,) or p(z) (N, n_bins), float32 (images read
    from the survey files come through ``num_workers`` reader processes)."""
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    device = next(net.parameters()).device
    crop = CenterCrop(crop_size=crop_size)
    was_training = net.training
    net.eval()
    chunks = (rows[i:i + batch_size] for i in range(0, len(rows), batch_size))
    out = [task.predict(net(crop(x).to(device))).float().cpu()
           for x in _batches(images, chunks, num_workers, pin=device.type == "cuda")]
    net.train(was_training)
    if not out:
        return np.zeros((0,) if task.kind == "binary" else (0, task.n_outputs), np.float32)
    return torch.cat(out).numpy()


@dataclass
class FitResult:
    """The kept network (best validation score) and the run's history."""

    net: Network
    best_score: float
    best_step: int
    steps: int
    history: list[dict] = field(default_factory=list)


def fit(net: Network, task: Task, images: Images, train_rows, train_targets, val_rows, val_targets,
        schedule: ScheduleConfig, augment: AugmentConfig, *, pretrained: bool, seed: int,
        out_dir: Path | None = None, device: str | None = None, progress: bool = False,
        max_steps: int | None = None, evaluate_start: bool = False, num_workers: int = 0) -> FitResult:
    """Train ``net`` on ``images[train_rows]`` (targets: P in [0, 1], or bin indices), keep
    the state with the best validation score.

    One loop for the supervised CNN and the fine-tuned encoder, on one process or under
    ``torchrun`` (DDP; each process takes its share of every global batch, every process
    evaluates the whole validation set, so all agree on the best step). With ``out_dir``
    a checkpoint is written at each evaluation and a killed run resumes from it exactly;
    ``max_steps`` stops after that many steps in all, after a checkpoint (as a kill would).
    ``evaluate_start`` makes the untrained state (step 0) a candidate too: a head started
    from the linear probe is then never worse on validation than the probe. Images read from
    the survey files (sets too large for memory) come through ``num_workers`` reader
    processes that prefetch the next batches; the batches are the same either way.
    """
    env = init_distributed(device)
    train_rows, val_rows = np.asarray(train_rows), np.asarray(val_rows)
    train_targets = torch.as_tensor(np.asarray(train_targets))
    n = len(train_rows)
    if n < 1:
        raise ValueError(f"{task.name}: no training galaxies")
    check_targets(task, train_targets.numpy(), "training")
    check_targets(task, np.asarray(val_targets), "validation")
    steps = total_steps(schedule, n, env.world_size)
    evals = sorted({max(1, round(steps * (i + 1) / N_EVALS)) for i in range(N_EVALS)})
    pipeline = AugmentationPipeline(TRAINING_AUGMENTATIONS, crop_size=augment.crop_size,
                                    max_jitter=augment.max_jitter)
    torch.manual_seed(seed)
    net = net.to(env.device)
    model = net
    if env.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    opt = make_optimizer(net, schedule, pretrained)
    generator = torch.Generator().manual_seed(seed * 1000 + env.rank)
    global_batch = schedule.batch_size * env.world_size
    cuda = env.device.type == "cuda"
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    step, best_score, best_step, best_state, history = 0, -math.inf, 0, None, []
    ckpt_path = None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt_path = out_dir / "checkpoint.pth.tar"
    if ckpt_path is not None and ckpt_path.exists():
        ck = load_safe(ckpt_path)
        net.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best_score, best_step = int(ck["step"]), float(ck["best_score"]), int(ck["best_step"])
        best_state, history = ck["best_state"], json.loads(ck["history"])
        set_rng_state(ck["rng"][min(env.rank, len(ck["rng"]) - 1)], generator)
        log.info("%s: resumed at step %d of %d", out_dir, step, steps)
    logger = RunLogger(out_dir, env.is_main, ("loss", "lr", "val_score")) if out_dir is not None else None
    if logger is not None and step:
        logger.truncate_after(step)

    def batch_rows(s: int) -> np.ndarray:
        """This process's rows of global step s: epoch permutations from (seed, epoch)."""
        first = s * global_batch
        idx = []
        while len(idx) < global_batch:
            epoch, offset = divmod(first + len(idx), n)
            perm = np.random.default_rng([seed, epoch]).permutation(n)
            idx.extend(perm[offset:offset + global_batch - len(idx)].tolist())
        mine = np.asarray(idx)[env.rank::env.world_size]
        return mine

    def evaluate(loss_value: float) -> None:
        nonlocal best_score, best_step, best_state
        if env.world_size > 1:  # BatchNorm statistics are per process: evaluate rank 0's everywhere
            for buffer in net.buffers():
                dist.broadcast(buffer, 0)
        pred = predict(net, task, images, val_rows, crop_size=augment.crop_size, num_workers=num_workers)
        score = task.score(pred, np.asarray(val_targets))
        history.append({"step": step, "loss": loss_value, "val_score": score})
        if logger is not None:
            logger.write(step, step * global_batch // n, loss=loss_value,
                         lr=opt.param_groups[-1]["lr"], val_score=score)
        if score > best_score or best_state is None:
            best_score, best_step = score, step
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}

    if evaluate_start and step == 0:
        evaluate(float("nan"))
    bar = None
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, unit="step", desc=f"{task.name}", leave=False)
    model.train()
    batches = (_batches(images, (train_rows[batch_rows(s)] for s in range(step, steps)), num_workers, pin=cuda)
               if step < steps else iter(()))         # a finished run starts no reader processes
    while step < steps:
        pos = batch_rows(step)
        x = pipeline(next(batches).to(env.device, non_blocking=cuda), generator)  # (b, 5, 64, 64)
        y = train_targets[pos].to(env.device)
        factor = step_lr_factor(step, steps, schedule.milestones)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        with amp:  # bf16 on GPUs, as in pretraining; full precision on the CPU
            loss = task.loss(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if bar is not None:
            bar.update(1)
        stop = max_steps is not None and step >= max_steps
        if step in evals:
            evaluate(float(loss.item()))
        if ckpt_path is not None and (step in evals or stop):
            states = gather_rng_states(env, generator)
            if env.is_main:
                save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                             "best_score": best_score, "best_step": best_step, "best_state": best_state,
                             "history": json.dumps(history), "rng": states}, ckpt_path)
            barrier(env)
        if stop:
            break
    if bar is not None:
        bar.close()
    if logger is not None:
        logger.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    return FitResult(net=net, best_score=best_score, best_step=best_step, steps=steps, history=history)


def _stack_images(items) -> Tensor:
    return torch.stack([it["image"] for it in items])


def _batches(images: Images, row_batches: Iterable[np.ndarray], num_workers: int, pin: bool):
    """The image batches of ``row_batches`` in order: indexed in memory, or, for images read
    from the survey files, through a DataLoader whose worker processes read ahead."""
    if isinstance(images.source, Tensor) or num_workers == 0:
        return (images[rows] for rows in row_batches)
    loader = torch.utils.data.DataLoader(images.source, batch_sampler=row_batches, num_workers=num_workers,
                                         collate_fn=_stack_images, pin_memory=pin, prefetch_factor=4)
    return iter(loader)


# ----------------------------------------------------------------------------- linear probe
def fit_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, task: Task,
              cfg: ProbeConfig, seed: int) -> tuple[Callable[[np.ndarray], np.ndarray], dict]:
    """A linear classifier on frozen representations, full-batch LBFGS (Appendix C.2: lr
    0.05, divided by 10 at epochs 10 and 25), the epoch with the best validation score kept.

    The representations are standardised with the training mean and standard deviation first
    (an affine map, so the classifier stays linear in the representation; it only helps
    LBFGS converge). Returns ``predict(x) -> P or p(z)`` and a summary whose ``weight`` and
    ``bias`` are the classifier on the raw representations (to start a fine-tuned head).
    """
    x = torch.as_tensor(np.asarray(train_x, np.float32))
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    y = torch.as_tensor(np.asarray(train_y))
    xv = (torch.as_tensor(np.asarray(val_x, np.float32)) - mean) / std
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], task.n_outputs)
    xs = (x - mean) / std
    opt = torch.optim.LBFGS(head.parameters(), lr=cfg.lr, max_iter=cfg.max_iter, line_search_fn=None)

    def closure():
        opt.zero_grad()
        loss = task.loss(head(xs), y) + cfg.weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    best, best_state, history = -math.inf, None, []
    for epoch in range(cfg.epochs):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)
        loss = opt.step(closure)
        with torch.no_grad():
            score = task.score(task.predict(head(xv)).numpy(), np.asarray(val_y))
        history.append({"epoch": epoch + 1, "loss": float(loss.detach()), "val_score": score})
        if score > best or best_state is None:
            best, best_state = score, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)

    @torch.no_grad()
    def predict_probe(features: np.ndarray) -> np.ndarray:
        f = (torch.as_tensor(np.asarray(features, np.float32)) - mean) / std
        return task.predict(head(f)).numpy()

    best_epoch = max(history, key=lambda h: h["val_score"])["epoch"]
    weight = (head.weight / std).detach()                                     # (n_out, D)
    bias = (head.bias - (head.weight * mean / std).sum(1)).detach()           # (n_out,)
    return predict_probe, {"best_score": best, "best_epoch": best_epoch, "history": history,
                           "weight": weight, "bias": bias}


# ----------------------------------------------------------------------------- label subsets
def label_subset(n_train: int, count: int, seed: int, split_seed: int) -> np.ndarray:
    """Positions of ``count`` training labels: the first ``count`` of a permutation drawn
    from (split_seed, seed), so that for one seed a smaller set is inside a larger one."""
    if count > n_train:
        raise ValueError(f"asked for {count} training labels but only {n_train} are available")
    return np.sort(np.random.default_rng([split_seed, 7919, seed]).permutation(n_train)[:count])


def sweep_points(counts: Iterable[int], n_train: int, repeats: int, repeat_up_to: float
                 ) -> tuple[list[tuple[int, int]], list[int]]:
    """(count, seed) pairs of a sweep: every count up to the training set, then all labels;
    counts up to ``repeat_up_to`` repeated over ``repeats`` seeds. Also returns the counts
    skipped because the training set is smaller."""
    kept = [c for c in counts if c < n_train]
    skipped = [c for c in counts if c >= n_train]
    points = []
    for c in kept + [n_train]:
        points += [(c, s) for s in range(repeats if c <= repeat_up_to else 1)]
    return points, skipped


# ----------------------------------------------------------------------------- run records
def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_fingerprint(path: Path) -> dict:
    st = Path(path).stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class RunStore:
    """Result files of one task: ``<root>/<key>.json`` (+ ``.npz`` predictions) and a
    checkpoint folder per network while it trains. A record is reused only when it was
    made with the same settings (``settings`` hash)."""

    def __init__(self, root: Path, settings: dict):
        self.root = Path(root)
        self.settings = settings
        self.settings_hash = _hash(settings)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def work_dir(self, key: str) -> Path:
        d = self.root / "work" / f"{key}-{self.settings_hash}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def get(self, key: str) -> dict | None:
        p = self.path(key)
        if not p.exists():
            return None
        rec = json.loads(p.read_text())
        return rec if rec.get("settings_hash") == self.settings_hash else None

    def put(self, key: str, record: dict, arrays: dict[str, np.ndarray]) -> dict:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        npz = p.with_suffix(".npz")
        tmp = npz.with_name(npz.stem + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(npz)
        record = {**record, "settings_hash": self.settings_hash, "predictions": npz.name}
        tmpj = p.with_suffix(".json.tmp")
        tmpj.write_text(json.dumps(record, indent=1, default=float))
        tmpj.replace(p)
        shutil.rmtree(self.root / "work" / f"{key}-{self.settings_hash}", ignore_errors=True)  # done: drop its checkpoint
        return record

    def arrays(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.path(key).with_suffix(".npz")) as z:
            return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------- data of a profile
@dataclass
class LabelledData:
    """The labelled galaxies of a profile with their images, split by stored ObjIDs."""

    dataset: SurveyDataset
    images: Images
    split_rows: dict[str, np.ndarray]  # rows of ``dataset`` per split


#: Labelled images up to this size are read into memory once; larger sets are read from disk.
PRELOAD_MAX_BYTES = 16 * 2**30


def labelled_data(profile: Profile, paths, deredden: bool, columns: Sequence[str] = (),
                  progress: bool = False, preload: bool | None = None) -> LabelledData:
    """The profile's labelled galaxies (the stored train/val/test splits of notebook 01),
    with their images de-reddened or not (photo-z: yes, Appendix E.2). ``preload`` None
    reads them into memory when they take at most :data:`PRELOAD_MAX_BYTES`."""
    from .provenance import data_files

    files = data_files(profile, paths)["labelled"]
    ds_all = SurveyDataset(files, columns=columns, deredden=deredden)
    splits = load_splits(paths.splits, ds_all.objids)
    order = np.concatenate([splits[k] for k in ("train", "val", "test")])
    ds = ds_all.select_objids(order)
    rows, start = {}, 0
    for k in ("train", "val", "test"):
        rows[k] = np.arange(start, start + len(splits[k]))
        start += len(splits[k])
    if preload is None:
        preload = len(ds) * 5 * 107 * 107 * 4 <= PRELOAD_MAX_BYTES
    images = Images.load(ds, progress=progress) if preload else Images(ds)
    return LabelledData(dataset=ds, images=images, split_rows=rows)


def moco_checkpoint(paths) -> Path:
    ckpt = paths.moco_checkpoint
    if not ckpt.exists():
        raise FileNotFoundError(f"no pretrained encoder at {ckpt}: run the pretraining first "
                                f"(scripts/pretrain.py or notebook 03-moco)")
    return ckpt


def _train_and_predict(kind: str, task: Task, data: LabelledData, train_rows, train_y, val_rows, val_y,
                       schedule: ScheduleConfig, profile: Profile, checkpoint: Path | None, seed: int,
                       work: Path, device, progress, probe: ProbeConfig | None = None,
                       features: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Train a supervised or fine-tuned network and predict the test split. With
    ``schedule.head_init == "probe"`` a fine-tuned head starts from the linear probe fitted
    on ``features`` (the representations of every row of ``data``)."""
    finetune = kind == "finetune"
    torch.manual_seed(seed)  # the new head's (and a fresh network's) weights depend on this run's seed only
    net = build_network(profile.pretrain.encoder, task.n_outputs, checkpoint if finetune else None)
    from_probe = finetune and schedule.head_init == "probe"
    if from_probe:
        _, info = fit_probe(features[train_rows], train_y, features[val_rows], val_y, task, probe, seed)
        with torch.no_grad():
            net.head.weight.copy_(info["weight"])
            net.head.bias.copy_(info["bias"])
    res = fit(net, task, data.images, train_rows, train_y, val_rows, val_y, schedule, profile.augment,
              pretrained=finetune, seed=seed, out_dir=work, device=device, progress=progress,
              evaluate_start=from_probe, num_workers=profile.pretrain.num_workers)  # reader processes
    pred = predict(res.net, task, data.images, data.split_rows["test"], crop_size=profile.augment.crop_size)
    return pred, {"best_step": res.best_step, "steps": res.steps, "val_score": res.best_score,
                  "history": res.history}


def representations_of(checkpoint: Path, encoder_cfg: EncoderConfig, images: Images, crop_size: int) -> np.ndarray:
    """The pretrained encoder's representations of every image (probe and probe-started heads)."""
    encoder, _ = load_encoder(checkpoint, encoder_cfg)
    if isinstance(images.source, Tensor):
        return encode(encoder, images.source, crop_size=crop_size).numpy()
    chunks = [encode(encoder, images[np.arange(i, min(i + 4096, len(images)))], crop_size=crop_size).numpy()
              for i in range(0, len(images), 4096)]  # read from disk a chunk at a time
    return np.concatenate(chunks)


# ----------------------------------------------------------------------------- morphology
def morphology_labels(dataset: SurveyDataset, question: str, min_votes: int) -> tuple[np.ndarray, np.ndarray]:
    """P of ``question`` (NaN where not labelled) and the question's vote count, for every
    galaxy: labelled means at least ``min_votes`` votes for the question (Appendix C.1) and
    at least one for its two answers."""
    q = gz2.question(question)
    votes = dataset.column(f"gz2/{q.name}/votes")
    total = votes.sum(axis=1)
    p = q.binary_fraction(votes)
    p = np.where(total >= min_votes, p, np.nan)
    return p.astype(np.float32), total.astype(np.int32)


def run_morphology(profile: Profile, runs_dir=None, models: Sequence[str] = MODELS, device: str | None = None,
                   progress: bool = True) -> dict:
    """Every (question, model, label count, seed) of the profile's morphology sweep; returns
    ``{"runs": [records...], "skipped_counts": {...}, "n_labelled": {...}}`` and writes
    ``metrics/morphology.json``."""
    from .provenance import Provenance, run_paths, write_metrics

    cfg = profile.morphology
    paths = run_paths(profile, runs_dir)
    ckpt = moco_checkpoint(paths)
    cols = tuple(f"gz2/{q}/votes" for q in cfg.questions)
    data = labelled_data(profile, paths, deredden=False, columns=cols, progress=progress)
    settings = {"morphology": asdict(cfg), "encoder": asdict(profile.pretrain.encoder),
                "augment": asdict(profile.augment), "checkpoint": file_fingerprint(ckpt),
                "splits": _hash(paths.splits.read_text()), "min_votes": profile.data.gz2_min_votes}
    store = RunStore(paths.downstream / "morphology", settings)
    reps = None
    if "probe" in models or ("finetune" in models and cfg.finetune.head_init == "probe"):
        reps = representations_of(ckpt, profile.pretrain.encoder, data.images, profile.augment.crop_size)
    records, skipped, n_labelled = [], {}, {}
    for question in cfg.questions:
        task = morphology_task(question)
        p, n_votes = morphology_labels(data.dataset, question, profile.data.gz2_min_votes)
        rows = {k: r[np.isfinite(p[r])] for k, r in data.split_rows.items()}
        n_labelled[question] = {k: int(len(r)) for k, r in rows.items()}
        points, skipped[question] = sweep_points(cfg.label_counts, len(rows["train"]), cfg.repeats, cfg.repeat_up_to)
        test_rows = rows["test"]
        for model in models:
            for count, seed in points:
                key = f"{question}/{model}/n{count}-s{seed}"
                rec = store.get(key)
                if rec is None:
                    sub = rows["train"][label_subset(len(rows["train"]), count, seed, profile.data.split_seed)]
                    if model == "probe":
                        predict_fn, info = fit_probe(reps[sub], p[sub], reps[rows["val"]], p[rows["val"]], task,
                                                     cfg.probe, seed)
                        pred = predict_fn(reps[test_rows])
                    else:
                        schedule = cfg.supervised if model == "supervised" else cfg.finetune
                        work = store.work_dir(key)
                        pred, info = _train_and_predict(model, task, _with_test(data, test_rows), sub, p[sub],
                                                        rows["val"], p[rows["val"]], schedule, profile, ckpt,
                                                        seed, work, device, progress, cfg.probe, reps)
                    metrics = binary_metrics(p[test_rows], pred)
                    rec = store.put(key, {"question": question, "model": model, "count": int(count),
                                          "seed": int(seed), "all_labels": count == len(rows["train"]),
                                          "metrics": metrics, **_summary(info)},
                                    {"p_true": p[test_rows], "p_pred": pred.astype(np.float32),
                                     "n_votes": n_votes[test_rows], "objid": data.dataset.objids[test_rows]})
                    log.info("%s: %s", key, metrics)
                records.append(rec)
    summary = {"runs": records, "skipped_counts": skipped, "n_labelled": n_labelled}
    write_metrics("morphology", summary, paths, Provenance.of(profile))
    return summary


def _summary(info: dict) -> dict:
    """The scalar part of a training summary (for the run record)."""
    return {k: v for k, v in info.items() if isinstance(v, (int, float))}


def _with_test(data: LabelledData, test_rows: np.ndarray) -> LabelledData:
    """``data`` whose test split is ``test_rows`` (the labelled galaxies of one question)."""
    return LabelledData(dataset=data.dataset, images=data.images, split_rows={**data.split_rows, "test": test_rows})


# ----------------------------------------------------------------------------- photo-z
def photometry_features(dataset: SurveyDataset) -> np.ndarray:
    """Catalogue photometry for the photometry-only reference: dereddened Petrosian r and
    the four dereddened model colours u-g, g-r, r-i, i-z (magnitudes: 22.5 - 2.5 log10 f)."""
    e_bv = dataset.column("e_bv").astype(np.float64)
    petro = dataset.column("catalog/petro_mag").astype(np.float64) - e_bv
    flux = np.maximum(dataset.column("catalog/model_flux").astype(np.float64), 1e-3)  # nmgy; >0 for the log
    mag = 22.5 - 2.5 * np.log10(flux) - e_bv
    return np.column_stack([petro[:, 2], -np.diff(mag, axis=1)]).astype(np.float32)


def photometry_reference(features: np.ndarray, z: np.ndarray, train_rows, val_rows, test_rows,
                         neighbours: Sequence[int]) -> tuple[np.ndarray, int]:
    """k-nearest-neighbour redshifts on catalogue magnitude and colours (standardised on the
    training set), k chosen by validation sigma_MAD: what photometry alone gives."""
    from sklearn.neighbors import KNeighborsRegressor

    mean, std = features[train_rows].mean(0), features[train_rows].std(0) + 1e-9
    f = (features - mean) / std
    best_k, best = None, math.inf
    for k in neighbours:
        k_eff = min(k, len(train_rows))
        knn = KNeighborsRegressor(n_neighbors=k_eff).fit(f[train_rows], z[train_rows])
        s = photoz_metrics(knn.predict(f[val_rows]), z[val_rows])["sigma_mad"]
        if s < best:
            best, best_k = s, k_eff
    knn = KNeighborsRegressor(n_neighbors=best_k).fit(f[train_rows], z[train_rows])
    return knn.predict(f[test_rows]).astype(np.float32), best_k


def run_photoz(profile: Profile, runs_dir=None, models: Sequence[str] = ("supervised", "finetune"),
               device: str | None = None, progress: bool = True, checkpoint: Path | None = None,
               fractions: Sequence[float] | None = None, schedule: ScheduleConfig | None = None,
               store_name: str = "photoz", write: bool = True) -> dict:
    """The photo-z sweep: supervised and fine-tuned networks at each training fraction,
    beside the photometry-only reference; writes ``metrics/photoz.json``.

    ``checkpoint``, ``fractions``, ``schedule`` and ``store_name`` let the ablation reuse it
    with its own pretrained encoders.
    """
    from .provenance import Provenance, run_paths, write_metrics

    cfg = profile.photoz
    paths = run_paths(profile, runs_dir)
    ckpt = checkpoint or moco_checkpoint(paths)
    fractions = tuple(fractions or cfg.fractions)
    task = photoz_task(cfg.bins, cfg.z_max)
    data = labelled_data(profile, paths, deredden=True,
                         columns=("specz_redshift", "e_bv", "catalog/petro_mag", "catalog/model_flux"),
                         progress=progress)
    z = data.dataset.column("specz_redshift").astype(np.float64)
    bad = ~np.isfinite(z) | (z < 0)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} labelled galaxies have no valid spectroscopic redshift, e.g. ObjID "
                         f"{int(data.dataset.objids[bad][0])}: the labelled set must hold spec-z galaxies only")
    target, n_clipped = task.bins.encode(z, return_clipped=True)
    rows = data.split_rows
    settings = {"photoz": asdict(cfg), "encoder": asdict(profile.pretrain.encoder), "fractions": fractions,
                "schedule": asdict(schedule) if schedule else None, "augment": asdict(profile.augment),
                "checkpoint": file_fingerprint(ckpt), "splits": _hash(paths.splits.read_text())}
    store = RunStore(paths.downstream / store_name, settings)
    n_train = len(rows["train"])
    reps = None
    if "finetune" in models and (schedule or cfg.finetune).head_init == "probe":
        reps = representations_of(ckpt, profile.pretrain.encoder, data.images, profile.augment.crop_size)
    records = []
    for fraction in fractions:
        count = max(1, int(round(fraction * n_train)))
        for seed in range(cfg.repeats if fraction <= cfg.repeat_up_to else 1):
            sub = rows["train"][label_subset(n_train, count, seed, profile.data.split_seed)]
            for model in models:
                key = f"{model}/f{fraction:g}-s{seed}"
                rec = store.get(key)
                if rec is None:
                    sched = schedule or (cfg.supervised if model == "supervised" else cfg.finetune)
                    probs, info = _train_and_predict(model, task, data, sub, target[sub], rows["val"],
                                                     target[rows["val"]], sched, profile, ckpt, seed,
                                                     store.work_dir(key), device, progress, cfg.probe, reps)
                    zp = task.bins.expected(probs)
                    zt = z[rows["test"]]
                    metrics = {**photoz_metrics(zp, zt), "crps": float(np.mean(task.bins.crps(probs, zt)))}
                    rec = store.put(key, {"model": model, "fraction": float(fraction), "count": count,
                                          "seed": seed, "metrics": metrics,
                                          **_summary(info)},
                                    {"z_spec": zt.astype(np.float32), "z_phot": zp.astype(np.float32),
                                     "pit": task.bins.cdf(probs, zt).astype(np.float32),
                                     "pz": probs.astype(np.float16)})
                    log.info("%s: %s", key, metrics)
                records.append(rec)
    reference = []
    if store_name == "photoz":
        feats = photometry_features(data.dataset)
        for fraction in fractions:
            count = max(1, int(round(fraction * n_train)))
            sub = rows["train"][label_subset(n_train, count, 0, profile.data.split_seed)]
            zp, k = photometry_reference(feats, z, sub, rows["val"], rows["test"], cfg.photometry_neighbours)
            reference.append({"model": "photometry", "fraction": float(fraction), "count": count, "k": k,
                              "metrics": photoz_metrics(zp, z[rows["test"]])})
    summary = {"runs": records, "photometry_reference": reference, "n_clipped": int(n_clipped),
               "z_max": cfg.z_max, "n_train": n_train, "n_val": len(rows["val"]), "n_test": len(rows["test"])}
    if write:
        write_metrics(store_name, summary, paths, Provenance.of(profile))
    return summary


# ----------------------------------------------------------------------------- ablation
def subset_name(names: Sequence[str]) -> str:
    """A folder-safe name of an augmentation set, in the paper's order."""
    from .augment import AUGMENTATIONS

    return "+".join(n for n in AUGMENTATIONS if n in names)


def run_ablation(profile: Profile, runs_dir=None, device: str | None = None, progress: bool = True) -> dict:
    """Appendix D: pretrain with each augmentation subset (``ablation.epochs`` epochs), then
    fine-tune each for photo-z at ``ablation.fractions``; writes ``metrics/ablation.json``."""
    from dataclasses import replace

    from .provenance import Provenance, data_files, run_paths, training_mad, write_metrics
    from .train import pretrain

    cfg = profile.ablation
    paths = run_paths(profile, runs_dir)
    files = data_files(profile, paths)
    survey = sorted(set(files["unlabelled"]) | set(files["labelled"]))
    mad = training_mad(profile, paths, SurveyDataset(survey))
    results = []
    for names in cfg.subsets:
        name = subset_name(names)
        augment = replace(profile.augment, enabled=tuple(names))
        pre = replace(profile.pretrain, epochs=cfg.epochs)
        ckpt = pretrain(pre, augment, survey, paths.ablation_checkpoints / name, mad=mad, resume="auto",
                        device=device, progress=progress)
        summary = run_photoz(profile, runs_dir, models=("finetune",), device=device, progress=progress,
                             checkpoint=ckpt, fractions=cfg.fractions, schedule=cfg.finetune,
                             store_name=f"ablation/{name}", write=False)
        results.append({"subset": list(names), "name": name,
                        "sigma_mad": {f"{r['fraction']:g}": r["metrics"]["sigma_mad"] for r in summary["runs"]},
                        "runs": summary["runs"]})
    out = {"subsets": results, "epochs": cfg.epochs, "fractions": list(cfg.fractions)}
    write_metrics("ablation", out, paths, Provenance.of(profile))
    return out


# ----------------------------------------------------------------------------- summaries
def kept_start(records: Sequence[dict]) -> str:
    """One line: for how many fine-tuned networks validation kept the starting state (step 0:
    with ``head_init: probe``, the linear probe itself)."""
    tuned = [r for r in records if r["model"] == "finetune"]
    at_start = sum(r["best_step"] == 0 for r in tuned)
    return (f"validation kept the starting state (step 0) for {at_start} of {len(tuned)} fine-tuned networks"
            + (": for those, no later evaluation improved on it" if at_start else ""))


def aggregate(records: Sequence[dict], keys: Sequence[str], metric: str) -> dict[tuple, dict]:
    """Mean, standard deviation (over seeds) and count of ``metrics[metric]`` per value of
    ``keys`` (e.g. ("question", "model", "count")); NaN values are left out and counted."""
    groups: dict[tuple, list[float]] = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(float(r["metrics"][metric]))
    out = {}
    for key, values in sorted(groups.items()):
        v = np.asarray(values, dtype=float)
        ok = v[np.isfinite(v)]
        out[key] = {"mean": float(ok.mean()) if ok.size else math.nan,
                    "std": float(ok.std()) if ok.size > 1 else 0.0, "n": int(ok.size), "n_nan": int(v.size - ok.size)}
    return out
