"""Reading the authors' SDSS galaxy files and sdsscl's mock survey files.

File format
-----------
One HDF5 file holds ``N`` galaxies. The authors' released files (DATA-FACTS; paper
Appendix A) have exactly these eight root datasets (:data:`sdsscl.constants.AUTHOR_KEYS`):

==========================  =================  ===========================================
key                         shape, dtype       meaning
==========================  =================  ===========================================
``images``                  (N, 5, 107, 107)   ugriz cutouts in nanomaggies, channel-first,
                            float32            *not* de-reddened
``e_bv``                    (N, 5) float       DR12 per-band extinction in magnitudes
                                               (``R_DR12 * E(B-V)``), not a scalar E(B-V)
``ra``, ``dec``             (N,) float64       degrees
``ObjID``                   (N,) int64         SDSS photometric object id, unique
``specObjID``               (N,) int64         spectroscopic id, ``NO_SPECOBJID`` (-1) if none
``specz_redshift``          (N,) float         spectroscopic redshift, NaN if none
``specz_redshift_err``      (N,) float         its error, NaN if none
==========================  =================  ===========================================

The authors' own files have a spectroscopic label for every row. sdsscl's mock survey
files (root attribute ``format = "sdsscl-survey-1"``, plus ``generator``,
``generator_version``, ``seed``, ``config`` (a JSON string) and ``n_galaxies``) add groups:

* ``catalog/``: photometry such as ``model_flux`` (N, 5), ``petro_mag`` (N, 5),
  ``petro_r50`` (N,), ``petro_r90`` (N,);
* ``gz2/``: ``n_volunteers`` (N,) int16 (0 = not classified) and, for each question ``q``
  of :mod:`sdsscl.gz2` (``smooth``, ``edge_on``, ``bar``), ``gz2/<q>/votes``
  (N, n_answers) int16 in the answer order of :class:`sdsscl.gz2.Question` and
  ``gz2/<q>/fraction`` (N, n_answers) float32, NaN where nobody answered;
* ``truth/``: the generating truth, (N,) or (N, k) arrays.

Every dataset in ``catalog/`` and ``gz2/`` is per-galaxy (first dimension N) and is
checked as such on validation; ``truth/`` and other extra datasets are checked when they
are requested as a column. Several files with the same per-galaxy shapes form one
dataset (``train*.h5``: a glob or a list), concatenated in sorted path order; a galaxy's
*global index* is its position in that concatenation.

What is here
------------
* :func:`validate_file`, :func:`validate_files`, :func:`scan_pixels`: checks that name the
  file, the key and the galaxy (:class:`DataFormatError`).
* :class:`SurveyDataset`: a ``torch`` dataset over one or many files, safe with
  ``DataLoader`` workers and ``DistributedSampler``.
* :func:`deredden`: the authors' de-reddening recipe.
* :func:`band_mad`: the per-band aggregate MAD behind the Gaussian-noise augmentation
  (paper Section 2), cached in a small JSON file.
* :func:`make_splits`, :func:`save_splits`, :func:`load_splits`: train/val/test splits
  by ObjID.
* :func:`has_specz`, :func:`gz2_min_votes`: boolean selectors.
* :func:`atomic_path`: write-then-rename for any output file.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from . import gz2
from .constants import AUTHOR_KEYS, N_BANDS, R_SF11, ebv_from_extinction

log = logging.getLogger(__name__)

PathsLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]

#: Root attribute ``format`` of sdsscl mock survey files.
MOCK_FORMAT = "sdsscl-survey-1"
#: Groups whose every dataset is per-galaxy (first dimension N), checked on validation.
PER_GALAXY_GROUPS: tuple[str, ...] = ("catalog", "gz2")
#: dtype kinds allowed for each author key ("f": floating point, "iu": integer).
AUTHOR_DTYPE_KINDS: dict[str, str] = {
    "images": "f",
    "e_bv": "f",
    "ra": "f",
    "dec": "f",
    "ObjID": "iu",
    "specObjID": "iu",
    "specz_redshift": "f",
    "specz_redshift_err": "f",
}
_KIND_WORDS = {"f": "a floating-point", "iu": "an integer", "biuf": "a numeric"}
#: Item keys a column may not take.
RESERVED_ITEM_KEYS = frozenset({"image", "index", "ObjID", "valid"})
NAN_POLICIES = ("raise", "mask")
#: Default train/val/test fractions of :func:`make_splits`.
DEFAULT_SPLIT_FRACTIONS: dict[str, float] = {"train": 0.7, "val": 0.1, "test": 0.2}


class DataFormatError(ValueError):
    """A data file breaks the format; the message names the file, the key and the galaxy.

    ``path``, ``key``, ``row`` (row in that file) and ``objid`` are kept as attributes
    (None where they do not apply).
    """

    def __init__(self, message: str, *, path=None, key: str | None = None,
                 row: int | None = None, objid: int | None = None):
        self.path = None if path is None else Path(path)
        self.key, self.row, self.objid = key, row, objid
        where = []
        if key is not None:
            where.append(f"key {key!r}")
        if row is not None:
            where.append(f"row {row}")
        if objid is not None:
            where.append(f"ObjID {objid}")
        parts = [str(path) if path is not None else "", ", ".join(where), message]
        super().__init__(": ".join(p for p in parts if p))


# ----------------------------------------------------------------------------- files


@contextlib.contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path beside ``path``, then rename it.

    The caller writes ``<path>.tmp-<pid>``; on normal exit it replaces ``path`` in one
    ``os.replace`` (readers never see a half-written file); on an exception the
    temporary file is removed and the exception propagates. One writer per path and
    process::

        with atomic_path("out.json") as tmp:
            tmp.write_text(text)
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def resolve_paths(paths: PathsLike) -> list[Path]:
    """Turn a path, a glob pattern or a list of them into a sorted list of files.

    Patterns (containing ``*``, ``?`` or ``[``) are expanded; one that matches nothing
    raises naming the pattern. Plain paths are returned as given (existence is checked
    by :func:`validate_file`). The result is sorted and free of repeats, so the order
    of galaxies (their global indices) does not depend on how the files were listed.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise ValueError("no data files given")
    out: set[Path] = set()
    for p in paths:
        s = os.path.expanduser(os.fspath(p))
        if glob.has_magic(s):
            matches = glob.glob(s)
            if not matches:
                raise DataFormatError(f"the pattern {s!r} matches no file")
            out.update(Path(m) for m in matches)
        else:
            out.add(Path(s))
    return sorted(out)


@dataclass
class SurveyFileInfo:
    """What :func:`validate_file` found in one file.

    path: the file. n: number of galaxies. keys: every dataset path in the file
    (``"images"``, ``"gz2/smooth/votes"``, ...), sorted. groups: every group path.
    attrs: root attributes (bytes decoded to str). shapes, dtypes: per dataset.
    objids: the ``ObjID`` column as int64.
    """

    path: Path
    n: int
    keys: tuple[str, ...]
    groups: tuple[str, ...]
    attrs: dict[str, Any]
    shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)
    dtypes: dict[str, np.dtype] = field(repr=False, default_factory=dict)
    objids: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.int64))

    @property
    def is_mock(self) -> bool:
        """True for an sdsscl mock survey file."""
        return self.attrs.get("format") == MOCK_FORMAT


def _open(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, turning every failure into a DataFormatError."""
    if not path.exists():
        raise DataFormatError("file not found", path=path)
    if not path.is_file():
        raise DataFormatError("not a regular file", path=path)
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise DataFormatError(f"cannot read the file ({err})", path=path) from err
    if not is_hdf5:
        raise DataFormatError("not an HDF5 file (no HDF5 signature)", path=path)
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataFormatError(f"cannot open the HDF5 file, it is truncated or corrupt ({err})",
                              path=path) from err


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _as_objids(raw: np.ndarray, path: Path) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype.kind == "u" and raw.size and raw.max() > np.iinfo(np.int64).max:
        raise DataFormatError("ObjIDs above the int64 range", path=path, key="ObjID")
    return raw.astype(np.int64, copy=False)


def _per_galaxy_shape_error(path, key, shape, n, expected=None) -> DataFormatError | None:
    if len(shape) == 0:
        return DataFormatError(f"is a scalar; expected one value per galaxy ({n} rows)",
                               path=path, key=key)
    if expected is not None and tuple(shape[1:]) != tuple(expected):
        return DataFormatError(f"per-galaxy shape {tuple(shape[1:])} (full shape {tuple(shape)}); "
                               f"expected {tuple(expected)}", path=path, key=key)
    return None


def _inspect(path: Path, f: h5py.File) -> SurveyFileInfo:
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, np.dtype] = {}
    groups: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            shapes[name], dtypes[name] = tuple(obj.shape), obj.dtype
        elif isinstance(obj, h5py.Group):
            groups.append(name)

    f.visititems(visit)
    missing = [k for k in AUTHOR_KEYS if k not in shapes]
    if missing:
        raise DataFormatError(f"missing author key(s) {', '.join(map(repr, missing))}; "
                              f"the format needs {sorted(AUTHOR_KEYS)}", path=path,
                              key=missing[0])
    for key, expected in AUTHOR_KEYS.items():
        err = _per_galaxy_shape_error(path, key, shapes[key], "N", expected)
        if err is not None:
            raise err
        kinds = AUTHOR_DTYPE_KINDS[key]
        if dtypes[key].kind not in kinds:
            raise DataFormatError(f"dtype {dtypes[key]} is not {_KIND_WORDS[kinds]} dtype",
                                  path=path, key=key)
    n = shapes["images"][0]
    if n == 0:
        raise DataFormatError("the file holds no galaxies (0 rows)", path=path, key="images")
    per_galaxy = list(AUTHOR_KEYS) + sorted(
        k for k in shapes if k.split("/", 1)[0] in PER_GALAXY_GROUPS and "/" in k)
    for key in per_galaxy:
        shape = shapes[key]
        err = _per_galaxy_shape_error(path, key, shape, n)
        if err is not None:
            raise err
        if shape[0] != n:
            raise DataFormatError(f"has {shape[0]} rows but key 'images' has {n} rows",
                                  path=path, key=key)
        if dtypes[key].kind not in "biuf":
            raise DataFormatError(f"dtype {dtypes[key]} is not numeric", path=path, key=key)
    for q in gz2.TREE:
        for leaf in ("votes", "fraction"):
            key = f"gz2/{q.name}/{leaf}"
            if key in shapes and shapes[key][1:] != (len(q.answers),):
                raise DataFormatError(f"per-galaxy shape {shapes[key][1:]}; expected "
                                      f"({len(q.answers)},) for the answers {q.answers}",
                                      path=path, key=key)
    objids = _as_objids(f["ObjID"][()], path)
    uniq, first, counts = np.unique(objids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        rows = np.flatnonzero(objids == dup[0]).tolist()
        raise DataFormatError(f"{dup.size} ObjID(s) appear more than once, e.g. ObjID {dup[0]} "
                              f"at rows {rows}", path=path, key="ObjID")
    return SurveyFileInfo(path=path, n=int(n), keys=tuple(sorted(shapes)),
                          groups=tuple(sorted(groups)),
                          attrs={k: _decode(v) for k, v in f.attrs.items()},
                          shapes=shapes, dtypes=dtypes, objids=objids)


def validate_file(path) -> SurveyFileInfo:
    """Check one file's metadata (not its pixels) and describe it.

    Raises :class:`DataFormatError` for a missing file, a file that is not HDF5 or is
    truncated, missing author keys, wrong per-galaxy shapes or non-numeric dtypes,
    datasets whose first dimension disagrees with ``images``, an empty file (N = 0) and
    repeated ObjIDs. Pixels are checked by :func:`scan_pixels`.
    """
    path = Path(path)
    with _open(path) as f:
        try:
            return _inspect(path, f)
        except OSError as err:
            raise DataFormatError(f"cannot read the HDF5 file, it is truncated or corrupt "
                                  f"({err})", path=path) from err


def validate_files(paths: PathsLike) -> list[SurveyFileInfo]:
    """:func:`validate_file` on every file of a dataset, then the checks across files.

    Across files: per-galaxy shapes of datasets present in several files must agree, and
    no ObjID may appear in two files.
    """
    infos = [validate_file(p) for p in resolve_paths(paths)]
    first_seen: dict[str, SurveyFileInfo] = {}
    for info in infos:
        for key in info.keys:
            ref = first_seen.setdefault(key, info)
            if ref is not info and ref.shapes[key][1:] != info.shapes[key][1:]:
                raise DataFormatError(
                    f"per-galaxy shapes disagree between files: {ref.path} has "
                    f"{ref.shapes[key][1:]} but {info.path} has {info.shapes[key][1:]}", key=key)
    if len(infos) > 1:
        objids = np.concatenate([i.objids for i in infos])
        file_of = np.repeat(np.arange(len(infos)), [i.n for i in infos])
        offsets = _offsets(infos)
        order = np.argsort(objids, kind="stable")
        same = np.flatnonzero(objids[order][1:] == objids[order][:-1])
        if same.size:
            a, b = order[same[0]], order[same[0] + 1]
            fa, fb = infos[file_of[a]], infos[file_of[b]]
            ra, rb = a - offsets[file_of[a]], b - offsets[file_of[b]]
            raise DataFormatError(
                f"{same.size} ObjID(s) appear in more than one row across files, e.g. ObjID "
                f"{objids[a]} at row {ra} of {fa.path} and row {rb} of {fb.path}", key="ObjID")
    return infos


def _offsets(infos: Sequence[SurveyFileInfo]) -> np.ndarray:
    """Global index of each file's first row, plus the total at the end."""
    return np.concatenate([[0], np.cumsum([i.n for i in infos])]).astype(np.int64)


def _light_info(path: Path) -> SurveyFileInfo:
    """File description without the checks (``SurveyDataset(validate=False)``)."""
    with _open(path) as f:
        try:
            shapes, dtypes = {}, {}

            def visit(name, obj):  # must return None, or h5py stops visiting
                if isinstance(obj, h5py.Dataset):
                    shapes[name], dtypes[name] = tuple(obj.shape), obj.dtype

            f.visititems(visit)
            for key in ("images", "ObjID"):
                if key not in shapes:
                    raise DataFormatError("missing author key", path=path, key=key)
            return SurveyFileInfo(path=path, n=int(shapes["images"][0]), keys=tuple(sorted(shapes)),
                                  groups=(), attrs={k: _decode(v) for k, v in f.attrs.items()},
                                  shapes=shapes, dtypes=dtypes,
                                  objids=_as_objids(f["ObjID"][()], path))
        except OSError as err:
            raise DataFormatError(f"cannot read the HDF5 file ({err})", path=path) from err


# ----------------------------------------------------------------------------- pixels


@dataclass
class FilePixelScan:
    """Non-finite pixels of one file: ``rows`` (in the file), their ``objids``,
    ``bad_per_row`` (count per listed row) and ``offset`` (global index of row 0)."""

    path: Path
    n: int
    offset: int
    n_bad_pixels: int
    rows: np.ndarray
    objids: np.ndarray
    bad_per_row: np.ndarray


@dataclass
class PixelScan:
    """Result of :func:`scan_pixels`: one :class:`FilePixelScan` per file."""

    files: list[FilePixelScan]

    @property
    def n_bad_pixels(self) -> int:
        return int(sum(f.n_bad_pixels for f in self.files))

    @property
    def n_bad_galaxies(self) -> int:
        return int(sum(f.rows.size for f in self.files))

    @property
    def global_indices(self) -> np.ndarray:
        """Global indices of the galaxies with at least one non-finite pixel."""
        return np.concatenate([f.rows + f.offset for f in self.files]).astype(np.int64)

    @property
    def objids(self) -> np.ndarray:
        return np.concatenate([f.objids for f in self.files]).astype(np.int64)

    @property
    def clean(self) -> bool:
        return self.n_bad_pixels == 0


def scan_pixels(paths: PathsLike | SurveyDataset, chunk: int = 256,
                progress: bool = False) -> PixelScan:
    """Count non-finite pixels in every file, reading ``chunk`` galaxies at a time.

    Memory stays at about ``chunk * 5 * 107 * 107 * 4`` bytes (58 MB for 256), so it
    works on files larger than memory. Drop the listed galaxies with
    ``ds.subset(~np.isin(ds.global_indices, scan.global_indices))`` or use
    ``nan_policy="mask"``.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    infos = paths.infos if isinstance(paths, SurveyDataset) else validate_files(paths)
    offsets = _offsets(infos)
    results = []
    with tqdm(total=int(offsets[-1]), disable=not progress, unit="galaxy",
              desc="scanning pixels") as bar:
        for info, offset in zip(infos, offsets):
            rows, counts = [], []
            with _open(info.path) as f:
                images = f["images"]
                for start in range(0, info.n, chunk):
                    block = images[start:start + chunk]  # (b, 5, 107, 107)
                    bad = (~np.isfinite(block)).reshape(block.shape[0], -1).sum(axis=1)
                    hit = np.flatnonzero(bad)
                    rows.append(hit + start)
                    counts.append(bad[hit])
                    bar.update(block.shape[0])
            rows_a = np.concatenate(rows).astype(np.int64)
            counts_a = np.concatenate(counts).astype(np.int64)
            results.append(FilePixelScan(path=info.path, n=info.n, offset=int(offset),
                                         n_bad_pixels=int(counts_a.sum()), rows=rows_a,
                                         objids=info.objids[rows_a], bad_per_row=counts_a))
            if rows_a.size:
                log.warning("%s: %d galaxies with %d non-finite pixels", info.path, rows_a.size,
                            counts_a.sum())
    return PixelScan(results)


# ----------------------------------------------------------------------------- reddening


def deredden(images, e_bv):
    """Undo Galactic extinction with the authors' recipe (DATA-FACTS).

    ``E(B-V) = mean(e_bv / R_DR12)`` over the bands, then every band b is multiplied by
    ``10**(R_SF11[b] * E(B-V) / 2.5)``.

    images: ``(..., 5, H, W)`` fluxes, numpy array or torch tensor (single or batched).
    e_bv: ``(..., 5)`` DR12 per-band extinction in magnitudes (the files' ``e_bv``), with
    leading dimensions matching ``images`` (or a single ``(5,)`` row for all).
    Returns the type of ``images`` (its float dtype and device kept); the input is not
    modified.
    """
    is_torch = isinstance(images, torch.Tensor)
    shape = tuple(images.shape)
    e_shape = tuple(e_bv.shape) if hasattr(e_bv, "shape") else np.shape(e_bv)
    if len(shape) < 3 or shape[-3] != N_BANDS or len(e_shape) < 1 or e_shape[-1] != N_BANDS:
        raise ValueError(f"deredden needs images (..., {N_BANDS}, H, W) and e_bv (..., {N_BANDS}); "
                         f"got {shape} and {e_shape}")
    try:
        ok = np.broadcast_shapes(e_shape[:-1], shape[:-3]) == shape[:-3]
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"e_bv {e_shape} does not match images {shape}")
    if isinstance(e_bv, torch.Tensor):
        e_bv = e_bv.detach().cpu().numpy()
    ebv = ebv_from_extinction(e_bv)  # (...,)
    factor = 10.0 ** (R_SF11 * ebv[..., None] / 2.5)  # (..., 5)
    if is_torch:
        dtype = images.dtype if images.is_floating_point() else torch.float32
        f = torch.as_tensor(factor, device=images.device).to(dtype)
        return images.to(dtype) * f[..., None, None]
    images = np.asarray(images)
    dtype = np.result_type(images.dtype, np.float32)
    return images.astype(dtype, copy=False) * factor.astype(dtype)[..., None, None]


# ----------------------------------------------------------------------------- dataset


def _torch_dtype_for(dtype: np.dtype) -> np.dtype:
    """numpy dtype a column is converted to before ``torch.as_tensor``."""
    if dtype.kind == "u" and dtype.itemsize > 1:
        return np.dtype(np.int64)  # torch has only uint8 among full-featured unsigned types
    return dtype


class SurveyDataset(torch.utils.data.Dataset):
    """Galaxies of one or many files as a ``torch`` dataset.

    paths: file, glob pattern or list of them (:func:`resolve_paths`; sorted order).
    columns: extra per-galaxy keys to return, by HDF5 path (``"specz_redshift"``,
        ``"e_bv"``, ``"gz2/smooth/fraction"``, ``"catalog/petro_mag"``, ``"truth/redshift"``).
        Each must exist with N rows in every file, checked at construction.
    deredden: de-redden each image with :func:`deredden` (the authors' recipe).
    indices: global indices (or a boolean mask over all galaxies) to keep; default all.
    nan_policy: ``"raise"``: a galaxy with non-finite pixels raises DataFormatError naming
        file, row, ObjID and count; ``"mask"``: such pixels become 0 and every item gets
        ``valid``, a bool (5, 107, 107) mask of the finite pixels.
    validate: run :func:`validate_files` (metadata only; pixels are checked when read).

    An item is a dict: ``image`` float32 tensor (5, 107, 107); ``index`` the global index
    (int); ``ObjID`` (int); each column as a tensor in its file dtype (float64 stays
    float64; unsigned ints wider than 8 bits become int64); ``valid`` with
    ``nan_policy="mask"``.

    HDF5 handles are opened lazily and per process (keyed by ``os.getpid()``), so every
    DataLoader worker opens its own; pickling drops them.
    """

    def __init__(self, paths: PathsLike, columns: Iterable[str] = (), deredden: bool = False,
                 indices=None, nan_policy: str = "raise", validate: bool = True):
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        files = resolve_paths(paths)
        self.infos: list[SurveyFileInfo] = (validate_files(files) if validate
                                            else [_light_info(p) for p in files])
        self.files: tuple[Path, ...] = tuple(i.path for i in self.infos)
        self._offsets = _offsets(self.infos)
        self._all_objids = np.concatenate([i.objids for i in self.infos])
        self.columns: tuple[str, ...] = tuple(columns)
        self._column_dtypes = {c: self._check_column(c) for c in self.columns}
        self.deredden = bool(deredden)
        self.nan_policy = nan_policy
        self._indices = self._global_indices(indices)
        self._handles: dict[int, tuple[h5py.File, dict[str, h5py.Dataset]]] = {}
        self._pid: int | None = None

    # -- metadata

    @property
    def n_total(self) -> int:
        """Galaxies in all files, before any selection."""
        return int(self._offsets[-1])

    @property
    def global_indices(self) -> np.ndarray:
        """Global index of each selected galaxy, in item order."""
        return self._indices.copy()

    @property
    def objids(self) -> np.ndarray:
        """ObjID of each selected galaxy, in item order."""
        return self._all_objids[self._indices]

    def locate(self, global_index: int) -> tuple[Path, int]:
        """File and row of a global index."""
        k = self._file_of(global_index)
        return self.files[k], int(global_index - self._offsets[k])

    def _file_of(self, g):
        return np.searchsorted(self._offsets, g, side="right") - 1

    def _global_indices(self, indices) -> np.ndarray:
        if indices is None:
            return np.arange(self.n_total, dtype=np.int64)
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (self.n_total,):
                raise ValueError(f"a boolean mask over the dataset needs shape ({self.n_total},), "
                                 f"got {idx.shape}")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise ValueError(f"indices must be a 1-d integer array or a boolean mask, "
                             f"got dtype {idx.dtype} and shape {idx.shape}")
        bad = idx[(idx < 0) | (idx >= self.n_total)]
        if bad.size:
            raise IndexError(f"global indices out of range [0, {self.n_total}): {bad[:10].tolist()}")
        return idx.astype(np.int64)

    def _check_column(self, name: str) -> np.dtype:
        """Check ``name`` is a per-galaxy numeric key of every file; its common dtype."""
        if name in RESERVED_ITEM_KEYS:
            raise ValueError(f"{name!r} is always part of an item; it cannot be a column")
        dtypes = []
        for info in self.infos:
            if name not in info.shapes:
                near = [k for k in info.keys if k != "images"]
                raise DataFormatError(f"requested column is not in the file (missing key); "
                                      f"available: {near}", path=info.path, key=name)
            err = _per_galaxy_shape_error(info.path, name, info.shapes[name], info.n)
            if err is not None:
                raise err
            if info.shapes[name][0] != info.n:
                raise DataFormatError(f"has {info.shapes[name][0]} rows but the file has "
                                      f"{info.n} galaxies", path=info.path, key=name)
            if info.dtypes[name].kind not in "biuf":
                raise DataFormatError(f"dtype {info.dtypes[name]} is not numeric",
                                      path=info.path, key=name)
            dtypes.append(info.dtypes[name])
        return _torch_dtype_for(np.result_type(*dtypes))

    def column(self, name: str) -> np.ndarray:
        """A whole column for the selected galaxies (item order), read without images."""
        if name == "images":
            raise ValueError("column() reads metadata; iterate over the dataset for images")
        if name == "ObjID":
            return self.objids
        dtype = self._check_column(name)
        parts = [np.asarray(self._datasets(k)[name][()]) for k in range(len(self.files))]
        return np.concatenate(parts).astype(dtype, copy=False)[self._indices]

    # -- subsets

    def subset(self, indices) -> SurveyDataset:
        """A new dataset with some of this one's galaxies.

        ``indices`` are *positions in this dataset* (0 .. len(self) - 1) or a boolean mask
        of length ``len(self)`` (e.g. from :func:`has_specz`); for a dataset built without
        ``indices`` positions and global indices coincide. Files are not re-validated.
        """
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"mask needs shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = np.zeros(0, np.int64)
        elif idx.dtype.kind not in "iu":
            raise ValueError(f"positions must be integers or a boolean mask, got {idx.dtype}")
        new = copy.copy(self)  # goes through __getstate__: no open handles are shared
        new._indices = self._indices[idx]
        return new

    def select_objids(self, objids) -> SurveyDataset:
        """The subset holding exactly these ObjIDs, in the order given (e.g. a split)."""
        objids = np.asarray(objids, dtype=np.int64).reshape(-1)
        mine = self.objids
        order = np.argsort(mine, kind="stable")
        pos = np.minimum(np.searchsorted(mine[order], objids), max(mine.size - 1, 0))
        found = order[pos] if mine.size else pos
        missing = objids[mine[found] != objids] if mine.size else objids
        if missing.size:
            raise KeyError(f"{missing.size} ObjID(s) are not in this dataset, e.g. "
                           f"{missing[:10].tolist()}")
        return self.subset(found)

    def fingerprint(self, samples: int = 64) -> str:
        """What the selected galaxies are, cheaply: SHA-256 (16 hex digits) of their number,
        their ObjIDs, and the raw pixels of ``samples`` of them spread evenly over the selection
        (first and last included). Unlike file names and times, it follows the content:
        regenerating an identical mock keeps it; other ObjIDs, or a generator that draws other
        images, change it. (An edit to a galaxy between the samples goes unseen.)"""
        h = hashlib.sha256()
        h.update(np.int64(len(self)).tobytes())
        h.update(np.ascontiguousarray(self.objids, dtype=np.int64).tobytes())
        if len(self):
            for i in np.unique(np.linspace(0, len(self) - 1, min(samples, len(self))).round().astype(np.int64)):
                g = int(self._indices[i])
                k = int(self._file_of(g))
                image = np.asarray(self._datasets(k)["images"][g - int(self._offsets[k])])
                h.update(np.ascontiguousarray(image, dtype=np.float32).tobytes())
        return h.hexdigest()[:16]

    # -- torch Dataset protocol

    def __len__(self) -> int:
        return int(self._indices.size)

    def _datasets(self, k: int) -> dict[str, h5py.Dataset]:
        """Per-process HDF5 handle of file k, with its datasets looked up once."""
        pid = os.getpid()
        if self._pid != pid:  # new process (DataLoader worker, fork): open our own files
            self._handles, self._pid = {}, pid
        if k not in self._handles:
            f = _open(self.files[k])
            self._handles[k] = (f, _LazyDatasets(f))
        return self._handles[k][1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} galaxies")
        g = int(self._indices[i])
        k = int(self._file_of(g))
        row = g - int(self._offsets[k])
        objid = int(self._all_objids[g])
        dsets = self._datasets(k)
        image = np.asarray(dsets["images"][row], dtype=np.float32)  # (5, 107, 107)
        finite = np.isfinite(image)
        all_finite = bool(finite.all())
        if not all_finite:
            if self.nan_policy == "raise":
                raise DataFormatError(
                    f"{image.size - int(finite.sum())} non-finite pixel(s) of {image.size}; use "
                    f"nan_policy='mask' or drop the galaxy (scan_pixels lists them)",
                    path=self.files[k], key="images", row=row, objid=objid)
            image = np.where(finite, image, np.float32(0))
        if self.deredden:
            e_bv = np.asarray(dsets["e_bv"][row], dtype=np.float64)
            if not np.isfinite(e_bv).all():
                raise DataFormatError(f"non-finite extinction {e_bv.tolist()} cannot de-redden",
                                      path=self.files[k], key="e_bv", row=row, objid=objid)
            image = deredden(image, e_bv).astype(np.float32, copy=False)
        item: dict[str, Any] = {"image": torch.from_numpy(np.ascontiguousarray(image)),
                                "index": g, "ObjID": objid}
        if self.nan_policy == "mask":
            item["valid"] = torch.from_numpy(finite)
        for name in self.columns:
            value = np.asarray(dsets[name][row], dtype=self._column_dtypes[name])
            item[name] = torch.as_tensor(value)
        return item

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def close(self) -> None:
        """Close the HDF5 handles this process opened."""
        if self._pid == os.getpid():
            for f, _ in self._handles.values():
                with contextlib.suppress(Exception):
                    f.close()
        self._handles, self._pid = {}, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"SurveyDataset({len(self)} of {self.n_total} galaxies in {len(self.files)} "
                f"file(s), columns={list(self.columns)}, deredden={self.deredden}, "
                f"nan_policy={self.nan_policy!r})")


class _LazyDatasets(dict):
    """``name -> h5py.Dataset`` of one open file, looked up on first use."""

    def __init__(self, f: h5py.File):
        super().__init__()
        self._f = f

    def __missing__(self, name):
        dset = self[name] = self._f[name]
        return dset


# ----------------------------------------------------------------------------- band MAD


def _sortable_keys(x: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the float32 order of ``x`` (finite values)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return np.where(u & np.uint32(0x80000000), ~u, u | np.uint32(0x80000000))


def _key_to_float(key: int) -> np.float32:
    u = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key & 0xFFFFFFFF)
    return np.array([u], dtype=np.uint32).view(np.float32)[0]


def _streaming_median(blocks: Callable[[], Iterable[np.ndarray]],
                      values: Callable[[int, np.ndarray], np.ndarray]):
    """Exact per-band median, as ``np.median`` would give, in two passes and bounded memory.

    blocks() yields (b, 5, H, W) float32 arrays (a fresh pass per call); values(c, x)
    maps band c of a block to the 1-d float32 values whose median is wanted. Pass 1
    histograms the top 16 bits of an order-preserving integer key; pass 2 histograms the
    low 16 bits inside the bucket(s) holding the middle rank(s), which fixes the exact key.
    Returns (median (5,) float32, count (5,) int64); NaN where a band has no values.
    """
    nb = 1 << 16
    coarse = np.zeros((N_BANDS, nb), np.int64)
    for block in blocks():
        for c in range(N_BANDS):
            coarse[c] += np.bincount(_sortable_keys(values(c, block[:, c])) >> 16, minlength=nb)
    counts = coarse.sum(axis=1)
    wanted: dict[int, list[tuple[int, int, int]]] = {}  # band -> [(rank, bucket, before)]
    for c in range(N_BANDS):
        cum = np.cumsum(coarse[c])
        for rank in sorted({(counts[c] - 1) // 2, counts[c] // 2}) if counts[c] else ():
            bucket = int(np.searchsorted(cum, rank, side="right"))
            wanted.setdefault(c, []).append((int(rank), bucket, int(cum[bucket] - coarse[c, bucket])))
    fine = {(c, b): np.zeros(nb, np.int64) for c, ws in wanted.items() for _, b, _ in ws}
    for block in blocks():
        for c, ws in wanted.items():
            keys = _sortable_keys(values(c, block[:, c]))
            top = keys >> 16
            for b in {b for _, b, _ in ws}:
                fine[c, b] += np.bincount(keys[top == b] & 0xFFFF, minlength=nb)
    median = np.full(N_BANDS, np.nan, np.float32)
    for c, ws in wanted.items():
        picks = []
        for rank, b, before in ws:
            low = int(np.searchsorted(np.cumsum(fine[c, b]), rank - before, side="right"))
            picks.append(_key_to_float((b << 16) | low))
        median[c] = np.mean(np.array(picks * (2 // len(picks)), dtype=np.float32))
    return median, counts


def _read_rows(ds: SurveyDataset, rows: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
    """Images (b, 5, H, W) float32 of sorted unique global ``rows``, de-reddened if ``ds`` is."""
    file_of = ds._file_of(rows)
    for k in np.unique(file_of):
        local = rows[file_of == k] - ds._offsets[k]
        with _open(ds.files[k]) as f:
            images, e_bv = f["images"], f["e_bv"]
            for s in range(0, local.size, chunk):
                r = local[s:s + chunk]
                # runs of consecutive rows, read as slices (h5py's list selection is slow)
                cuts = np.flatnonzero(np.diff(r) != 1) + 1
                runs = [slice(int(a[0]), int(a[-1]) + 1) for a in np.split(r, cuts)]
                block = np.concatenate([images[sl] for sl in runs]).astype(np.float32, copy=False)
                if ds.deredden:
                    ebv = np.concatenate([e_bv[sl] for sl in runs]).astype(np.float64)
                    block = deredden(block, ebv).astype(np.float32, copy=False)
                yield block


def _compute_band_mad(ds: SurveyDataset, rows: np.ndarray, chunk: int = 256,
                      progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-band median |x - median(x)| over the finite pixels of the galaxies at
    global ``rows``; four streaming passes. Returns (mad (5,), pixel count (5,))."""
    def blocks():
        it = _read_rows(ds, rows, chunk)
        return tqdm(it, total=-(-rows.size // chunk), disable=not progress, desc="band MAD")

    def finite(c, x):
        v = x.ravel()
        return v[np.isfinite(v)]

    med, counts = _streaming_median(blocks, finite)
    mad, _ = _streaming_median(blocks, lambda c, x: np.abs(finite(c, x) - med[c]))
    return mad.astype(np.float64), counts


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def default_stats_path(first_file) -> Path:
    """Where :func:`band_mad` caches by default: ``<stem>.stats.json`` beside the file."""
    first_file = Path(first_file)
    return first_file.with_name(f"{first_file.stem}.stats.json")


def band_mad(dataset_or_paths, max_galaxies: int = 10000, seed: int = 0, cache=None,
             chunk: int = 256, progress: bool = False) -> np.ndarray:
    """Per-band aggregate median absolute deviation of all pixel values, shape (5,).

    For each band, ``median(|x - median(x)|)`` over every finite pixel of the chosen
    galaxies (no 1.4826 factor). This is the scale the paper multiplies by U(1, 3) for
    its Gaussian-noise augmentation (Section 2, "pre-computed over all training
    examples"). Galaxies: those of the dataset (a :class:`SurveyDataset`: its selection
    and its ``deredden`` setting; paths: every galaxy, raw pixels); when there are more
    than ``max_galaxies``, a subsample of ``max_galaxies`` drawn without replacement by
    ``numpy.random.default_rng(seed)`` from the sorted unique global indices. The result
    is exact (streaming, bounded memory: about ``chunk`` images at a time).

    cache: JSON path; None: :func:`default_stats_path` of the first file; False: no
    cache. An entry is keyed by the files' names, sizes and mtimes, the selection,
    ``max_galaxies``, ``seed`` and ``deredden``; anything else is recomputed. An
    unwritable default location raises before computing (pass ``cache=``).
    """
    ds = (dataset_or_paths if isinstance(dataset_or_paths, SurveyDataset)
          else SurveyDataset(dataset_or_paths))
    if max_galaxies < 1:
        raise ValueError(f"max_galaxies must be >= 1, got {max_galaxies}")
    candidates = np.unique(ds.global_indices)
    if candidates.size == 0:
        raise ValueError("band_mad of an empty selection")
    selection = ("all" if candidates.size == ds.n_total
                 else hashlib.sha1(candidates.tobytes()).hexdigest())
    key = {"quantity": "band_mad", "version": 1,
           "files": [_file_stamp(p) for p in ds.files], "selection": selection,
           "max_galaxies": int(max_galaxies), "seed": int(seed), "deredden": ds.deredden}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    cache_path = None if cache is False else Path(cache) if cache is not None else \
        default_stats_path(ds.files[0])
    stored: dict[str, Any] = {}
    if cache_path is not None:
        if not os.access(cache_path.parent, os.W_OK):
            raise PermissionError(
                f"cannot write the band-MAD cache {cache_path}: its folder is not writable; "
                f"pass band_mad(..., cache=<writable path>) or cache=False")
        if cache_path.exists():
            try:
                stored = json.loads(cache_path.read_text())
                entry = stored.get("band_mad", {}).get(digest)
                if entry is not None and entry.get("key") == key:
                    log.info("band_mad: cached in %s", cache_path)
                    return np.asarray(entry["value"], dtype=np.float64)
            except (OSError, ValueError, AttributeError) as err:
                log.warning("band_mad: ignoring unreadable cache %s (%s)", cache_path, err)
                stored = {}

    if candidates.size > max_galaxies:
        rows = np.sort(np.random.default_rng(seed).choice(candidates, size=max_galaxies,
                                                          replace=False))
    else:
        rows = candidates
    mad, counts = _compute_band_mad(ds, rows, chunk=chunk, progress=progress)
    log.info("band_mad over %d galaxies (seed %d): %s", rows.size, seed, np.round(mad, 5).tolist())
    if cache_path is not None:
        def stale(entry) -> bool:  # same files, but changed since
            files = entry.get("key", {}).get("files", []) if isinstance(entry, dict) else []
            return ([f.get("name") for f in files] == [f["name"] for f in key["files"]]
                    and files != key["files"])

        entries = {d: e for d, e in (stored.get("band_mad") or {}).items()
                   if isinstance(e, dict) and not stale(e)}
        entries[digest] = {"key": key, "value": mad.tolist(), "n_galaxies": int(rows.size),
                           "n_pixels": counts.tolist()}
        stored = {**(stored if isinstance(stored, dict) else {}), "format": "sdsscl-stats-1",
                  "band_mad": entries}
        with atomic_path(cache_path) as tmp:
            tmp.write_text(json.dumps(stored, indent=1))
    return mad


# ----------------------------------------------------------------------------- splits


def _objids_of(objids) -> np.ndarray:
    if isinstance(objids, SurveyDataset):
        return objids.objids
    return np.asarray(objids, dtype=np.int64)


def make_splits(objids, fractions: Mapping[str, float] | None = None,
                seed: int = 0) -> dict[str, np.ndarray]:
    """Split ObjIDs at random into named parts (default train/val/test 0.7/0.1/0.2).

    objids: array of unique ObjIDs or a :class:`SurveyDataset`. They are sorted before the
    permutation by ``numpy.random.default_rng(seed)``, so the split depends only on the
    set of ObjIDs and the seed. Part sizes are ``round(cumsum(fractions) * N)``
    differences. Returns ``{name: sorted int64 ObjIDs}`` in the order of ``fractions``.
    """
    fractions = dict(DEFAULT_SPLIT_FRACTIONS if fractions is None else fractions)
    values = np.array(list(fractions.values()), dtype=np.float64)
    if not fractions or (values < 0).any() or not np.isclose(values.sum(), 1.0, atol=1e-9):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {fractions} "
                         f"(sum {values.sum():.6g})")
    ids = np.sort(_objids_of(objids))
    if ids.size and (ids[1:] == ids[:-1]).any():
        raise ValueError(f"ObjIDs repeat, e.g. {ids[1:][ids[1:] == ids[:-1]][:5].tolist()}")
    perm = np.random.default_rng(seed).permutation(ids.size)
    bounds = np.round(np.cumsum(values) * ids.size).astype(np.int64)
    bounds[-1] = ids.size
    starts = np.concatenate([[0], bounds[:-1]])
    return {name: np.sort(ids[perm[a:b]]) for name, a, b in zip(fractions, starts, bounds)}


def save_splits(splits: Mapping[str, np.ndarray], path, seed: int,
                fractions: Mapping[str, float]) -> Path:
    """Store splits atomically as JSON (``.json``) or HDF5 (``.h5``/``.hdf5``).

    seed and fractions are stored beside the ObjIDs for provenance.
    """
    path = Path(path)
    arrays = {name: np.asarray(ids, dtype=np.int64) for name, ids in splits.items()}
    every = np.concatenate(list(arrays.values())) if arrays else np.zeros(0, np.int64)
    if np.unique(every).size != every.size:
        raise ValueError("splits overlap: some ObjIDs are in more than one split")
    meta = {"format": "sdsscl-splits-1", "seed": int(seed),
            "fractions": {k: float(v) for k, v in fractions.items()}}
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".json":
            doc = {**meta, "splits": {k: v.tolist() for k, v in arrays.items()}}
            tmp.write_text(json.dumps(doc))
        elif suffix in (".h5", ".hdf5"):
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = meta["format"]
                f.attrs["seed"] = meta["seed"]
                f.attrs["fractions"] = json.dumps(meta["fractions"])
                f.attrs["order"] = json.dumps(list(arrays))  # HDF5 lists members by name
                for k, v in arrays.items():
                    f.create_dataset(k, data=v)
        else:
            raise ValueError(f"{path}: splits are stored as .json, .h5 or .hdf5")
    return path


def load_splits(path, objids=None) -> dict[str, np.ndarray]:
    """Read splits written by :func:`save_splits`; ``{name: int64 ObjIDs}``.

    objids: the dataset's ObjIDs (array or :class:`SurveyDataset`); when given, every
    stored ObjID must be among them (DataFormatError listing the first missing ones).
    """
    path = Path(path)
    if not path.exists():
        raise DataFormatError("splits file not found", path=path)
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text())
            splits = {k: np.asarray(v, dtype=np.int64) for k, v in doc["splits"].items()}
        except (ValueError, KeyError, TypeError) as err:
            raise DataFormatError(f"not a splits file ({err})", path=path) from err
    else:
        with _open(path) as f:
            names = json.loads(f.attrs["order"]) if "order" in f.attrs else list(f)
            splits = {k: np.asarray(f[k][()], dtype=np.int64) for k in names
                      if isinstance(f.get(k), h5py.Dataset)}
    if objids is not None:
        known = _objids_of(objids)
        for name, ids in splits.items():
            missing = ids[~np.isin(ids, known)]
            if missing.size:
                raise DataFormatError(f"{missing.size} of {ids.size} ObjIDs are not in the "
                                      f"dataset, first: {missing[:10].tolist()}",
                                      path=path, key=name)
    return splits


# ----------------------------------------------------------------------------- selectors


def has_specz(ds) -> np.ndarray:
    """Boolean mask: finite spectroscopic redshift (a SurveyDataset, or its specz array)."""
    z = ds.column("specz_redshift") if isinstance(ds, SurveyDataset) else np.asarray(ds)
    return np.isfinite(z)


def gz2_min_votes(ds, question: str, min_votes: int = 5, count: str = "all") -> np.ndarray:
    """Boolean mask: at least ``min_votes`` GZ2 votes for ``question``.

    ds: a SurveyDataset (reads ``gz2/<question>/votes``) or a ``(N, n_answers)`` vote
    array in :mod:`sdsscl.gz2` answer order. count: ``"all"`` sums the votes of all the
    question's answers (GZ2's total count; the paper trains on questions with >= 5
    votes); ``"binary"`` counts only the two answers the label P is built from
    (:meth:`Question.binary_count`), which guarantees a finite P.
    """
    q = gz2.question(question)  # KeyError listing the valid names
    if count not in ("all", "binary"):
        raise ValueError(f"count must be 'all' or 'binary', got {count!r}")
    if isinstance(ds, SurveyDataset):
        key = f"gz2/{q.name}/votes"
        for info in ds.infos:
            if key not in info.shapes:
                what = "has no gz2 group" if not any(k.startswith("gz2/") for k in info.keys) \
                    else "has no votes for this question"
                raise DataFormatError(f"the file {what} (GZ2 labels come with mock files)",
                                      path=info.path, key=key)
        votes = ds.column(key)
    else:
        votes = np.asarray(ds)
        if votes.shape[-1:] != (len(q.answers),):
            raise ValueError(f"votes for {q.name!r} need shape (N, {len(q.answers)}) "
                             f"(answers {q.answers}), got {votes.shape}")
    total = q.binary_count(votes) if count == "binary" else votes.sum(axis=-1)
    return np.asarray(total >= min_votes)
