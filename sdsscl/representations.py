"""Representations: the encoder's output for every galaxy (Section 3.1, Appendix B).

The preprocessing is the pretraining's without its randomness: the raw 107x107 cutout in
nanomaggies, centre-cropped to the 64x64 the network saw (:class:`sdsscl.augment.CenterCrop`).

File layout (``runs/<profile>/representations/moco.h5``, written by
:func:`extract_representations`):

===================  ================  ==============================================
dataset              shape, dtype      meaning
===================  ================  ==============================================
``representations``  (N, D) float16    one row per galaxy, in the dataset's order
                     or float32
``ObjID``            (N,) int64        the galaxy of each row
``done``             (n_chunks,) bool  which chunks of ``chunk`` rows are written
===================  ================  ==============================================

Root attributes: ``n``, ``dimension``, ``dtype``, ``crop_size``, ``chunk``,
``source_files`` and ``source_stamps`` (size and modification time of each file), plus the
caller's (:func:`run_extraction` adds the checkpoint, its SHA-256 and the encoder config).
All of them identify the result: a file, finished or partial, whose attributes or ObjIDs
differ from what a run would write is not reused.

Storage: float16 by default. The paper's 2048-d vectors of ~1.3M galaxies take
1.3M x 2048 x 2 bytes = 5.3 GB in float16 against 10.6 GB in float32. float16 keeps 11
significant bits (unit roundoff u = 2^-11 ~ 4.9e-4), so each component moves by at most u
relatively and a cosine similarity by at most ~4u ~ 2e-3 (for the non-negative vectors a
ReLU network's average pool gives, by at most ~2u ~ 1e-3). The rounding errors of the D
components mostly cancel: measured changes are at most ~3e-5 and ~5e-6 on average, both for
a small network's 64-d vectors and for random non-negative 2048-d ones
(tests/test_representations.py), far below the gaps between a galaxy's neighbours. Vectors
are read back as float32. Values above float16's range (65504) raise.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .augment import CenterCrop
from .constants import CROP_SIZE
from .data import DataFormatError, SurveyDataset, atomic_path

log = logging.getLogger(__name__)

#: On-disk dtypes of the representations (``representations.dtype`` of a profile).
STORAGE_DTYPES: tuple[str, ...] = ("float16", "float32")
#: Default chunk (the unit of resumption and of the ranks' shares), in batches.
CHUNK_BATCHES = 16
#: File name of a profile's MoCo representations under ``runs/<profile>/representations``.
REPRESENTATIONS_FILE = "moco.h5"
#: Attributes only per-rank part files carry; removed from the finished file.
_PART_ATTRS = ("rank", "world_size")


@torch.no_grad()
def encode(encoder: nn.Module, images: Tensor, crop_size: int = CROP_SIZE, batch_size: int = 256) -> Tensor:
    """Representations of a batch of cutouts: (B, 5, H, W) -> (B, D) float32, on the CPU.

    The images are centre-cropped to ``crop_size`` (already-cropped images pass unchanged)
    and run through ``encoder`` in eval mode on the encoder's device, ``batch_size`` at a
    time. The encoder's train/eval mode is restored afterwards.
    """
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"encode: expected images of shape (B, bands, H, W), got {tuple(images.shape)}")
    device = next(encoder.parameters()).device
    crop = CenterCrop(crop_size=crop_size)
    was_training = encoder.training
    encoder.eval()
    try:
        out = [encoder(crop(images[i:i + batch_size].to(device, torch.float32))).float().cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:
        encoder.train(was_training)
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)  # (B, D)


def l2_normalize(vectors) -> np.ndarray:
    """Rows scaled to unit length, float32 (cosine similarity becomes an inner product)."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(norms, np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- loaded vectors
@dataclass
class Representations:
    """Representation vectors of a list of galaxies.

    vectors: (N, D) float32, row i is galaxy ``objids[i]``. objids: (N,) int64.
    attrs: the file's attributes (:func:`load_representations`). path: the file, if any.
    """

    vectors: np.ndarray
    objids: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    _order: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.objids = np.asarray(self.objids, dtype=np.int64)
        if self.vectors.ndim != 2 or self.objids.shape != (self.vectors.shape[0],):
            raise ValueError(f"Representations need vectors (N, D) and objids (N,), got "
                             f"{self.vectors.shape} and {self.objids.shape}")

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def dim(self) -> int:
        """D, the dimension of the representation (2048 for the paper's ResNet50)."""
        return self.vectors.shape[1]

    def index_of(self, objids) -> np.ndarray:
        """Rows of these ObjIDs (same shape as given); KeyError naming any that are not here."""
        if self._order is None:
            self._order = np.argsort(self.objids, kind="stable")
        return rows_of_objids(self.objids, objids, self._order,
                              where=f" in {self.path}" if self.path is not None else "")


def rows_of_objids(all_objids: np.ndarray, objids, order: np.ndarray, where: str = "") -> np.ndarray:
    """Rows of ``objids`` in ``all_objids`` (``order`` = its argsort); KeyError naming the
    ObjIDs that are missing (``where`` says where they were looked for)."""
    query = np.asarray(objids, dtype=np.int64)
    flat = query.reshape(-1)
    if len(all_objids) == 0:
        missing, rows = flat, np.zeros_like(flat)
    else:
        pos = np.minimum(np.searchsorted(all_objids[order], flat), len(all_objids) - 1)
        rows = order[pos]
        missing = flat[all_objids[rows] != flat]
    if missing.size:
        raise KeyError(f"{missing.size} ObjID(s) not found{where}: {missing[:10].tolist()}")
    return rows.reshape(query.shape)


def check_matches_dataset(reps: Representations, dataset: SurveyDataset) -> None:
    """Raise :class:`DataFormatError` unless ``reps`` holds exactly the dataset's galaxies,
    in its order; the message names the file and the count, or the first row that differs."""
    theirs = dataset.objids
    if len(reps) != len(theirs):
        raise DataFormatError(f"holds {len(reps)} representations but the dataset has {len(theirs)} "
                              f"galaxies; extract them again for this dataset", path=reps.path, key="ObjID")
    differ = np.flatnonzero(reps.objids != theirs)
    if differ.size:
        r = int(differ[0])
        raise DataFormatError(f"{differ.size} row(s) differ from the dataset; the first has ObjID "
                              f"{int(reps.objids[r])} in the file but {int(theirs[r])} in the dataset",
                              path=reps.path, key="ObjID", row=r)


def load_representations(path, dataset: SurveyDataset | None = None) -> Representations:
    """Read a finished representations file (vectors as float32).

    With ``dataset``, the file must hold exactly its galaxies in its order
    (:func:`check_matches_dataset`). Raises FileNotFoundError for a missing file and
    :class:`DataFormatError` for one that is unfinished or lacks a dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no representations file at {path} (scripts/extract_representations.py "
                                f"writes it)")
    with h5py.File(path, "r") as f:
        for key in ("representations", "ObjID", "done"):
            if key not in f:
                raise DataFormatError("missing dataset; not a representations file", path=path, key=key)
        done = f["done"][()]
        if not done.all():
            raise DataFormatError(f"unfinished: {int((~done).sum())} of {done.size} chunks missing",
                                  path=path, key="done")
        vectors = f["representations"].astype(np.float32)[()]  # converted while reading
        reps = Representations(vectors, f["ObjID"][()], _read_attrs(f), path)
    if dataset is not None:
        check_matches_dataset(reps, dataset)
    return reps


# ----------------------------------------------------------------------------- HDF5 helpers
def _attr_value(value: Any) -> Any:
    """An attribute as it reads back: lists and tuples become lists of str."""
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return value


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    def plain(v):
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v.tolist()]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return {k: plain(v) for k, v in f.attrs.items()}


def _write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        if isinstance(value, (list, tuple)):
            value = np.array([str(v) for v in value], dtype=h5py.string_dtype())
        f.attrs[key] = value


def _create(f: h5py.File, objids: np.ndarray, meta: Mapping[str, Any], n_chunks: int) -> None:
    """Empty datasets of a representations file (storage is allocated as rows are written)."""
    n, dim, dtype = len(objids), int(meta["dimension"]), np.dtype(meta["dtype"])
    rows = max(1, min(n, (1 << 20) // (dim * dtype.itemsize)))  # ~1 MB HDF5 chunks
    f.create_dataset("representations", shape=(n, dim), dtype=dtype, chunks=(rows, dim))
    f.create_dataset("ObjID", data=np.asarray(objids, dtype=np.int64))
    f.create_dataset("done", data=np.zeros(n_chunks, dtype=bool))
    _write_attrs(f, meta)


def _mismatch(path: Path, objids: np.ndarray, meta: Mapping[str, Any], finished: bool = False) -> str | None:
    """Why the file at ``path`` is not the one ``meta`` and ``objids`` describe (None: it is);
    ``finished``: it must also have every chunk done."""
    if not path.is_file():
        return "no file"
    want = {k: _attr_value(v) for k, v in meta.items()}
    try:
        with h5py.File(path, "r") as f:
            have = _read_attrs(f)
            if have != want:
                keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
                return f"attributes differ: {keys}"
            if f["representations"].shape != (len(objids), meta["dimension"]):
                return f"shape {f['representations'].shape}"
            if not np.array_equal(f["ObjID"][()], objids):
                return "ObjIDs differ"
            if f["done"].shape != (math.ceil(len(objids) / meta["chunk"]),):
                return "chunk count differs"
            if finished and not f["done"][()].all():
                return "unfinished"
    except (OSError, KeyError) as err:  # truncated by a kill, or not ours
        return f"unreadable ({err})"
    return None


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"size={st.st_size} mtime_ns={st.st_mtime_ns}"


def file_sha256(path, block: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes (the checkpoint fingerprint of :func:`run_extraction`)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while data := fh.read(block):
            h.update(data)
    return h.hexdigest()


# ----------------------------------------------------------------------------- extraction
def _rank_world(device: torch.device) -> tuple[int, int]:
    """(rank, world size): from the process group, joined first when torchrun started us."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        from .train import init_distributed

        init_distributed(str(device))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def part_path(out_path, rank: int = 0, world_size: int = 1) -> Path:
    """Where a run in progress writes: ``<out>.partial``, or ``<out>.rank<r>.partial`` per rank."""
    out_path = Path(out_path)
    suffix = ".partial" if world_size == 1 else f".rank{rank}.partial"
    return out_path.with_name(out_path.name + suffix)


def _collate_images(items) -> Tensor:
    return torch.stack([it["image"] for it in items])  # (B, 5, 107, 107)


def _fill_chunks(f: h5py.File, encoder: nn.Module, dataset: SurveyDataset, chunks: list[int], *,
                 chunk: int, batch_size: int, crop_size: int, num_workers: int, show: bool) -> None:
    """Encode the galaxies of ``chunks`` and write each chunk, flushed, then mark it done."""
    from tqdm.auto import tqdm

    n = len(dataset)
    batches, owner = [], []
    for c in chunks:
        stop = min(n, (c + 1) * chunk)
        for s in range(c * chunk, stop, batch_size):
            batches.append(list(range(s, min(stop, s + batch_size))))
            owner.append(c)
    if not batches:
        return
    cuda = next(encoder.parameters()).device.type == "cuda"
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                        collate_fn=_collate_images, pin_memory=cuda)
    reps = f["representations"]
    limit = np.finfo(reps.dtype).max
    bar = tqdm(total=sum(map(len, batches)), unit="galaxy", desc="representations", disable=not show)
    pending: list[Tensor] = []
    for b, images in enumerate(loader):
        pending.append(encode(encoder, images, crop_size, batch_size))  # (b, D)
        bar.update(len(images))
        if b + 1 < len(batches) and owner[b + 1] == owner[b]:
            continue
        c = owner[b]
        block = torch.cat(pending).numpy()  # (rows of chunk c, D) float32
        pending = []
        if not np.isfinite(block).all() or np.abs(block).max() > limit:
            raise ValueError(f"representations of chunk {c} (rows {c * chunk}..) are not finite or "
                             f"exceed the {reps.dtype} range ({limit:g}); store them as float32")
        reps[c * chunk:c * chunk + len(block)] = block.astype(reps.dtype)
        f["done"][c] = True
        f.flush()
    bar.close()


def extract_representations(encoder: nn.Module, dataset_or_paths, out_path, *, batch_size: int = 256,
                            dtype: str = "float16", crop_size: int = CROP_SIZE, chunk: int | None = None,
                            num_workers: int = 0, progress: bool = True, device=None,
                            attrs: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the representation of every galaxy of a dataset to the HDF5 file ``out_path``.

    encoder: the network up to its average pool (:func:`sdsscl.checkpoint.load_encoder`),
        run in eval mode on its device (``device`` moves it first).
    dataset_or_paths: a :class:`SurveyDataset` (its selection, in its order) or its files.
    batch_size: images per forward pass. dtype: ``float16`` or ``float32`` on disk (see the
        module docstring). crop_size: the centre crop the network sees (64).
    chunk: galaxies per chunk (default ``16 * batch_size``): each finished chunk is written,
        flushed and marked ``done``, so a killed run loses at most one chunk.
    num_workers: DataLoader processes reading HDF5. progress: a tqdm bar (rank 0).
    attrs: extra root attributes that identify the result (str, int, float, bool or lists of
        str), e.g. the checkpoint's fingerprint.
    overwrite: recompute even if ``out_path`` is already this result.

    Resumable: the work goes to ``<out>.partial``; a rerun continues its unfinished chunks if
    it describes the same result (N, ObjIDs, D, dtype and every attribute), else starts over.
    A finished ``out_path`` describing the same result is kept as it is. Under torchrun
    (WORLD_SIZE > 1) rank r computes chunks r, r + W, r + 2W, ... into
    ``<out>.rank<r>.partial`` and, after a barrier, rank 0 merges the parts
    (:func:`merge_parts`). The finished file appears in one rename. Returns ``out_path``.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if batch_size < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"batch_size and chunk must be >= 1, got {batch_size} and {chunk}")
    clash = sorted(set(_PART_ATTRS) & set(attrs or {}))
    if clash:
        raise ValueError(f"attrs may not use the reserved names {clash}")
    dataset = (dataset_or_paths if isinstance(dataset_or_paths, SurveyDataset)
               else SurveyDataset(dataset_or_paths))
    if len(dataset) == 0:
        raise ValueError(f"no galaxies to encode in {dataset!r}")
    if device is not None:
        encoder = encoder.to(device)
    rank, world = _rank_world(next(encoder.parameters()).device)
    out = Path(out_path)
    chunk = int(chunk or CHUNK_BATCHES * batch_size)
    objids = dataset.objids
    dim = int(encode(encoder, dataset[0]["image"][None], crop_size).shape[1])  # D, from one galaxy
    meta = {"n": len(dataset), "dimension": dim, "dtype": dtype, "crop_size": int(crop_size),
            "chunk": chunk, "source_files": [str(p.resolve()) for p in dataset.files],
            "source_stamps": [_file_stamp(p) for p in dataset.files], **dict(attrs or {})}
    if not overwrite and _mismatch(out, objids, meta, finished=True) is None:
        log.info("%s already holds these representations; nothing to do", out)
        return out
    _barrier(world)  # every rank has looked at the old file before rank 0 replaces it
    n_chunks = math.ceil(len(dataset) / chunk)
    part = part_path(out, rank, world)
    part_meta = {**meta, "rank": rank, "world_size": world}
    why = "overwrite requested" if overwrite else _mismatch(part, objids, part_meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    if why is not None:
        if part.exists():
            log.info("starting %s afresh (%s)", part, why)
        with h5py.File(part, "w") as f:
            _create(f, objids, part_meta, n_chunks)
    with h5py.File(part, "r+") as f:
        done = f["done"][()]
        todo = [c for c in range(rank, n_chunks, world) if not done[c]]
        if why is None:
            log.info("resuming %s: %d of this rank's chunks left", part, len(todo))
        _fill_chunks(f, encoder, dataset, todo, chunk=chunk, batch_size=batch_size, crop_size=crop_size,
                     num_workers=num_workers, show=progress and rank == 0)
    _barrier(world)
    if rank == 0:
        if world == 1:
            with h5py.File(part, "r+") as f:
                for key in _PART_ATTRS:
                    del f.attrs[key]
            os.replace(part, out)
        else:
            merge_parts([part_path(out, r, world) for r in range(world)], out)
        for stale in out.parent.glob(f"{out.name}.rank*.partial"):  # ours, and any of other world sizes
            stale.unlink()
        log.info("wrote %d representations of dimension %d (%s) to %s", len(dataset), dim, dtype, out)
    _barrier(world)
    return out


def merge_parts(parts: Iterable, out_path) -> Path:
    """Join per-rank part files into one finished file at ``out_path`` (written atomically).

    The parts must describe the same result (ObjIDs and attributes other than ``rank``);
    chunk c is copied from the part that has ``done[c]``. A chunk no part finished raises
    :class:`DataFormatError`. The parts are left in place. Returns ``out_path``.
    """
    parts = [Path(p) for p in parts]
    out = Path(out_path)
    absent = [str(p) for p in parts if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"cannot write {out}: part file(s) missing (did every rank run?): {absent}")
    files = [h5py.File(p, "r") for p in parts]
    try:
        meta = {k: v for k, v in _read_attrs(files[0]).items() if k not in _PART_ATTRS}
        objids = files[0]["ObjID"][()]
        for p, f in zip(parts[1:], files[1:]):
            other = {k: v for k, v in _read_attrs(f).items() if k not in _PART_ATTRS}
            if other != meta or not np.array_equal(f["ObjID"][()], objids):
                raise DataFormatError(f"describes another result than {parts[0].name}", path=p)
        done = np.stack([f["done"][()] for f in files])  # (parts, n_chunks)
        missing = np.flatnonzero(~done.any(axis=0))
        if missing.size:
            raise DataFormatError(f"{missing.size} chunk(s) were finished by no part, e.g. "
                                  f"{missing[:10].tolist()}; run the extraction again to finish them",
                                  path=out)
        n, chunk = len(objids), int(meta["chunk"])
        # the file is closed (inner context) before atomic_path renames it (outer)
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as g:
            _create(g, objids, meta, done.shape[1])
            for c in range(done.shape[1]):
                rows = slice(c * chunk, min(n, (c + 1) * chunk))
                g["representations"][rows] = files[int(np.argmax(done[:, c]))]["representations"][rows]
            g["done"][:] = True
    finally:
        for f in files:
            f.close()
    return out


# ----------------------------------------------------------------------------- a profile's run
def profile_dataset(profile, paths) -> SurveyDataset:
    """Every galaxy a profile reads: its unlabelled and labelled files, deduplicated and
    sorted (the pretraining's survey, :func:`sdsscl.train.run_pretraining`)."""
    from .provenance import data_files

    files = data_files(profile, paths)
    return SurveyDataset(sorted(set(files["unlabelled"]) | set(files["labelled"])))


def representations_path(paths) -> Path:
    """The MoCo representations file of a run: ``runs/<profile>/representations/moco.h5``."""
    return paths.representations / REPRESENTATIONS_FILE


def run_extraction(profile, runs_dir=None, checkpoint=None, device: str | None = None,
                   progress: bool = True) -> Path:
    """Representations of all of a profile's galaxies from its MoCo checkpoint.

    The entry point behind ``scripts/extract_representations.py``: the encoder is
    ``profile.pretrain.encoder`` filled from ``checkpoint`` (default: the run's
    ``checkpoints/moco/checkpoint.pth.tar``), the galaxies those of :func:`profile_dataset`,
    the settings ``profile.representations``; the result is :func:`representations_path`.
    The file records the checkpoint's SHA-256, so a rerun with the same checkpoint and data
    does nothing and one with a new checkpoint recomputes. Under torchrun each process
    takes its share (:func:`extract_representations`).
    """
    from .checkpoint import load_encoder
    from .train import prepare_run

    paths, env = prepare_run(profile, runs_dir, device, progress)
    dataset = profile_dataset(profile, paths)
    ckpt = Path(checkpoint) if checkpoint is not None else paths.moco_checkpoint
    encoder, report = load_encoder(ckpt, profile.pretrain.encoder)
    log.info("encoder: %s", report)
    cfg = profile.representations
    attrs = {"checkpoint": str(ckpt.resolve()), "checkpoint_sha256": file_sha256(ckpt),
             "encoder": json.dumps(asdict(profile.pretrain.encoder), sort_keys=True)}
    return extract_representations(encoder.to(env.device), dataset, representations_path(paths),
                                   batch_size=cfg.batch_size, dtype=cfg.dtype,
                                   crop_size=profile.augment.crop_size,
                                   num_workers=profile.pretrain.num_workers, progress=progress,
                                   attrs=attrs)
