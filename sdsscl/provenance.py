"""Where every artifact lives, and the line that says where it came from.

One module owns the paths (the showyourwork habit): a run of profile ``P`` keeps all its
artifacts under ``runs/<run_name>/`` (:class:`RunPaths`)::

    runs/default/
        mock.h5              the mock survey (data.source = mock)
        splits.json          train/val/test ObjIDs of the labelled galaxies
        stats.json           dataset statistics (the per-band MAD of the noise augmentation)
        checkpoints/         model weights
        representations/     encoder outputs
        metrics/<name>.json  every number the book prints, with its provenance
        figures/<name>.png   every figure the book shows, with its provenance line
        downstream/<task>/   trained downstream networks and their results

A run whose overrides touch only downstream settings (``--set photoz.finetune.max_steps=1000``)
gets a folder of its own for its results but reads the mock, splits, checkpoints and
representations of the profile's folder (``RunPaths.upstream``, ``Profile.upstream_name``).

Every figure and table carries a provenance line (:class:`Provenance`): profile, seed,
mock seed, git commit and config hash, so a number can be traced to the settings and
the code that made it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import subprocess
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sdsscl.config import ConfigError, Profile, project_root

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class RunPaths:
    """The artifact folders of one run (nothing is created until asked).

    root: the run's own folder (downstream results, metrics, figures).
    upstream: the folder of the artifacts that only upstream settings change (mock, splits,
        band MAD, MoCo checkpoint, representations; ``Profile.upstream_name``); the run's own
        folder unless given.
    """

    root: Path
    upstream: Path | None = None

    @property
    def shared(self) -> Path:
        return self.upstream if self.upstream is not None else self.root

    @property
    def mock(self) -> Path:
        return self.shared / "mock.h5"

    @property
    def splits(self) -> Path:
        return self.shared / "splits.json"

    @property
    def stats(self) -> Path:
        return self.shared / "stats.json"

    @property
    def checkpoints(self) -> Path:
        return self.shared / "checkpoints"

    @property
    def ablation_checkpoints(self) -> Path:
        """Pretraining per augmentation subset (Appendix D): the run's own, since the ablation's
        settings are downstream ones."""
        return self.root / "checkpoints" / "ablation"

    @property
    def downstream(self) -> Path:
        """Trained downstream networks and their results, one folder per task."""
        return self.root / "downstream"

    @property
    def moco_checkpoint(self) -> Path:
        """The run's pretrained MoCo checkpoint (``scripts/pretrain.py`` writes it)."""
        return self.checkpoints / "moco" / "checkpoint.pth.tar"

    @property
    def representations(self) -> Path:
        return self.shared / "representations"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    def metric(self, name: str) -> Path:
        return self.metrics / f"{name}.json"

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"


def run_paths(profile: Profile, runs_dir: str | Path | None = None) -> RunPaths:
    """Artifact folders of ``profile``: ``<runs>/<profile.run_name>``, with the upstream ones in
    ``<runs>/<profile.upstream_name>``, where ``<runs>`` is ``runs_dir``, else ``$SDSSCL_RUNS``
    (tests point it at a temporary folder), else ``runs/`` in the project."""
    base = Path(runs_dir or os.environ.get("SDSSCL_RUNS") or project_root() / "runs")
    if not base.is_absolute():
        base = project_root() / base
    return RunPaths(base / profile.run_name, base / profile.upstream_name)


def data_files(profile: Profile, paths: RunPaths) -> dict[str, list[Path]]:
    """The HDF5 files a profile reads: ``{"unlabelled": [...], "labelled": [...]}``.

    For the mock both are the one mock file (it holds labelled and unlabelled galaxies,
    told apart by ``specObjID``). For real files, a missing file raises with the path.
    """
    if profile.data.source == "mock":
        return {"unlabelled": [paths.mock], "labelled": [paths.mock]}
    root = Path(profile.data.root)
    if not root.is_absolute():
        root = project_root() / root
    found: dict[str, list[Path]] = {"unlabelled": [], "labelled": []}
    if profile.data.unlabelled:
        found["unlabelled"] = sorted(root.glob(profile.data.unlabelled))
    if profile.data.labelled:
        found["labelled"] = [root / profile.data.labelled] if (root / profile.data.labelled).is_file() else []
    for kind, pattern in (("unlabelled", profile.data.unlabelled), ("labelled", profile.data.labelled)):
        if pattern and not found[kind]:
            raise FileNotFoundError(f"profile {profile.name!r}: no {kind} files match {root / pattern} "
                                    f"(set data.root to the folder holding the authors' files)")
    return found


# --------------------------------------------------------------------------- provenance
@lru_cache(maxsize=None)
def git_commit(root: Path | None = None) -> str:
    """Short commit of the checkout, with ``-dirty`` if tracked files changed; ``unknown``
    outside a git checkout."""
    try:
        cwd = root or project_root()
        commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=cwd, check=True,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError, ConfigError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@dataclass(frozen=True)
class Provenance:
    """What a figure or a number was made from."""

    profile: str
    seed: int
    mock_seed: int | None
    commit: str
    config_hash: str

    @classmethod
    def of(cls, profile: Profile) -> "Provenance":
        return cls(profile=profile.run_name, seed=profile.seed,
                   mock_seed=profile.mock.seed if profile.mock else None,
                   commit=git_commit(), config_hash=profile.config_hash())

    @property
    def data_label(self) -> str:
        return "real SDSS" if self.mock_seed is None else "MOCK survey"

    def line(self) -> str:
        """One line for the foot of a figure or table."""
        seeds = f"seed {self.seed}" + (f" · mock seed {self.mock_seed}" if self.mock_seed is not None else "")
        return (f"sdsscl · {self.data_label} · profile {self.profile} · {seeds} · "
                f"commit {self.commit} · config {self.config_hash}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stamp_figure(fig, provenance: Provenance, fontsize: float = 6.0) -> None:
    """Write the provenance line just below a matplotlib figure (a tight bounding box, as
    ``save_figure`` and notebooks use, takes it in without overlapping the axes)."""
    fig.text(0.5, -0.01, provenance.line(), ha="center", va="top", fontsize=fontsize,
             color="0.35", family="monospace")


def save_figure(fig, name: str, paths: RunPaths, provenance: Provenance, dpi: int) -> None:
    """Stamp ``fig`` with its provenance and save it as ``paths.figure(name)``
    (``figures/<name>.png``).

    Returns None on purpose: as the last line of a notebook cell it then prints nothing
    (a returned path would be shown, and nbval does not honour a trailing semicolon).
    """
    stamp_figure(fig, provenance)
    paths.figures.mkdir(parents=True, exist_ok=True)
    fig.savefig(paths.figure(name), dpi=dpi, bbox_inches="tight", metadata={"Description": provenance.line()})


def write_metrics(name: str, metrics: Mapping[str, Any], paths: RunPaths, provenance: Provenance) -> Path:
    """Write ``metrics/<name>.json``: the numbers with their provenance beside them."""
    paths.metrics.mkdir(parents=True, exist_ok=True)
    out = paths.metric(name)
    record = {"provenance": provenance.to_dict(), "metrics": _jsonable(metrics)}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    return out


def read_metrics(name: str, paths: RunPaths) -> dict[str, Any]:
    """The ``metrics`` part of ``metrics/<name>.json``."""
    return json.loads(paths.metric(name).read_text())["metrics"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- the mock
def mock_fingerprint(paths: RunPaths) -> str | None:
    """What identifies the mock file on disk: the generator's own record of its settings
    (HDF5 attribute ``config``) and the file's modification time; None without a
    finished file."""
    import h5py

    if not paths.mock.is_file():
        return None
    with h5py.File(paths.mock, "r") as f:
        if not f.attrs.get("complete", False):
            return None
        config = str(f.attrs.get("config", ""))
    return f"{config}|{paths.mock.stat().st_mtime_ns}"


def ensure_mock(profile: Profile, paths: RunPaths, progress: bool = True) -> bool:
    """Make sure ``paths.mock`` is the profile's mock survey, generating it if it is missing
    or was made with other settings. Returns True if it was (re)generated.

    The generator decides what "the same mock" means (:func:`sdsscl.mock.generate_mock`
    keeps a finished file with the same n, seed and generator configuration); a file with
    other settings in this run's folder is stale and is replaced.
    """
    if profile.mock is None:
        raise ValueError(f"profile {profile.name!r} reads real files; it has no mock")
    from sdsscl.mock import generate_mock  # imported here: only a mock run needs it

    before = mock_fingerprint(paths)
    generate_mock(paths.mock, n=profile.mock.n_galaxies, seed=profile.mock.seed, workers=profile.mock.workers,
                  progress=progress, overwrite=True)
    return mock_fingerprint(paths) != before


# --------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class Table:
    """A small table that shows as Markdown in a notebook and as text elsewhere, with its
    provenance line underneath. Cells are formatted once, here: floats with ``digits``
    significant figures, integers of five digits or more with thousands separators, so
    printed numbers are rounded and stable across machines."""

    headers: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    provenance: Provenance | None = None
    caption: str = ""
    digits: int = 4

    def cells(self) -> list[list[str]]:
        return [[self._format(v) for v in row] for row in self.rows]

    def _format(self, value: Any) -> str:
        if hasattr(value, "item") and not isinstance(value, (list, tuple)):
            value = value.item()  # numpy scalar
        if isinstance(value, bool) or value is None:
            return {True: "yes", False: "no", None: "–"}[value]
        if isinstance(value, float):
            if not math.isfinite(value):
                return "–"
            return f"{value:.{self.digits}g}" if value != 0 else "0"
        if isinstance(value, int):
            return f"{value:,}" if abs(value) >= 10_000 else str(value)
        if isinstance(value, (list, tuple)):
            return ", ".join(self._format(v) for v in value)
        return str(value)

    def _repr_markdown_(self) -> str:
        def row(cells):
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        lines = [f"**{self.caption}**", ""] if self.caption else []
        lines += [row(self.headers), row(["---"] * len(self.headers))]
        lines += [row(cells) for cells in self.cells()]
        if self.provenance is not None:
            lines += ["", f"<sub>{self.provenance.line()}</sub>"]
        return "\n".join(lines)

    def __str__(self) -> str:
        cells = self.cells()
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(self.headers)]
        lines = [self.caption] if self.caption else []
        lines.append("  ".join(h.ljust(w) for h, w in zip(self.headers, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
        if self.provenance is not None:
            lines.append(self.provenance.line())
        return "\n".join(lines)

    __repr__ = __str__


def write_splits(profile: Profile, paths: RunPaths, labelled) -> dict[str, np.ndarray]:
    """Split the labelled galaxies (a dataset with ``objids``) into train/validation/test by
    ObjID with ``data.split`` and ``data.split_seed``, save them to ``runs/<profile>/splits.json``
    for every later chapter and script, and return them."""
    from .data import make_splits, save_splits

    fractions = {"train": profile.data.split.train, "val": profile.data.split.val, "test": profile.data.split.test}
    splits = make_splits(labelled.objids, fractions, seed=profile.data.split_seed)
    save_splits(splits, paths.splits, seed=profile.data.split_seed, fractions=fractions)
    return splits


def training_mad(profile: Profile, paths: RunPaths, dataset) -> np.ndarray:
    """The run's per-band MAD that scales the noise augmentation (Section 2).

    Over ``data.mad_subsample`` galaxies of ``dataset`` (all of them when null), drawn with
    ``data.split_seed``, cached in ``runs/<profile>/stats.json``: every chapter and the
    pretraining use the same numbers.
    """
    from .data import band_mad

    return band_mad(dataset, max_galaxies=profile.data.mad_subsample or len(dataset),
                    seed=profile.data.split_seed, cache=paths.stats)
