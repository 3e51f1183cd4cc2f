"""Profiles: every setting a run depends on, in one typed object.

A *profile* is a small YAML file in ``profiles/`` (``smoke``, ``default``, ``paper``)
read into a :class:`Profile`. Each section is a frozen dataclass whose fields are the
only keys the YAML may use; the values are checked once, here, on entry:

* an unknown key, a missing key or a value of the wrong type raises :class:`ConfigError`;
* an impossible value (a negative count, split fractions that do not sum to one, an
  augmentation nobody implements) raises :class:`ConfigError` from ``__post_init__``.

A profile may start from another with ``extends: NAME`` and change only what differs
(``smoke`` extends ``default``). Overrides are a flat dict of dotted keys,
``{"mock.n_galaxies": 500}``, applied to the YAML before validation, so they pass the
same checks.

:meth:`Profile.config_hash` is a stable hash of the resolved configuration: the same
settings give the same hash on any machine, whatever the YAML looked like. Fields that
change only how fast a run goes, not what it computes (``mock.workers``), are left out.

New sections (pretraining, downstream tasks) are added as a dataclass and one field of
:class:`Profile`; the loader needs no change.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

#: The profiles that ship with the project, in increasing cost.
PROFILE_NAMES: tuple[str, ...] = ("smoke", "default", "paper")

#: The augmentations of Section 2 by name, in the order they are applied; the same names as
#: :data:`sdsscl.augment.AUGMENTATIONS` (kept here so reading a profile needs no torch).
AUGMENTATIONS: tuple[str, ...] = ("reddening", "psf", "rotate", "jitter_crop", "noise")

_HASHED = "hashed"  # field metadata key: False for settings that never change a result


class ConfigError(ValueError):
    """A profile or an override that cannot describe a run."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class MockConfig:
    """The locally generated mock SDSS survey (``sdsscl.mock``).

    n_galaxies: number of galaxies in the mock file.
    seed: seed of the mock realisation; the same seed gives the same file.
    workers: processes used to render it (speed only: not part of the config hash).
    """

    n_galaxies: int
    seed: int
    workers: int = field(metadata={_HASHED: False})

    def __post_init__(self):
        _check(self.n_galaxies >= 10, f"mock.n_galaxies must be at least 10, got {self.n_galaxies}")
        _check(self.seed >= 0, f"mock.seed must be non-negative, got {self.seed}")
        _check(self.workers >= 1, f"mock.workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class SplitConfig:
    """Fractions of the labelled set for training, validation and test (Appendix C.2)."""

    train: float
    val: float
    test: float

    def __post_init__(self):
        for name in ("train", "val", "test"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"data.split.{name} must lie in [0, 1], got {value}")
        total = self.train + self.val + self.test
        _check(abs(total - 1.0) < 1e-9, f"data.split fractions must sum to 1, got {total}")
        _check(self.train > 0 and self.test > 0, "data.split needs a non-empty train and test set")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are split.

    source: ``mock`` (the mock survey under ``runs/<profile>/``) or ``files`` (the
        authors' HDF5 files under ``root``).
    root: folder holding the real files, relative to the project root or absolute
        (``files`` only; ``null`` for the mock).
    unlabelled: glob under ``root`` for the unlabelled training files (``train*.h5``).
    labelled: file under ``root`` with spectroscopic labels (``sdss_w_specz_valid.h5``).
    split: train / validation / test fractions of the labelled galaxies.
    split_seed: seed of that split.
    mad_subsample: galaxies used to pre-compute the per-band median absolute
        deviation that scales the noise augmentation; ``null`` uses all of them.
    gz2_min_votes: least number of GZ2 votes for a question to label a galaxy.
    """

    source: Literal["mock", "files"]
    root: str | None
    unlabelled: str | None
    labelled: str | None
    split: SplitConfig
    split_seed: int
    mad_subsample: int | None
    gz2_min_votes: int

    def __post_init__(self):
        if self.source == "files":
            _check(self.root is not None and (self.unlabelled or self.labelled) is not None,
                   "data.source 'files' needs data.root and a data.unlabelled glob or data.labelled file")
        else:
            _check(self.root is None and self.unlabelled is None and self.labelled is None,
                   "data.root, data.unlabelled and data.labelled belong to data.source 'files'; "
                   "the mock lives under runs/<profile>/")
        _check(self.split_seed >= 0, f"data.split_seed must be non-negative, got {self.split_seed}")
        _check(self.mad_subsample is None or self.mad_subsample >= 1,
               f"data.mad_subsample must be positive or null, got {self.mad_subsample}")
        _check(self.gz2_min_votes >= 1, f"data.gz2_min_votes must be at least 1, got {self.gz2_min_votes}")


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentations of Section 2 that make the two views of a galaxy.

    max_ebv: upper end of E(B-V) ~ U(0, max_ebv) for galactic reddening.
    psf_sigma_r_arcsec: the r-band Gaussian PSF width is drawn from N(0, this), arcsec
        (its absolute value), and scaled to the other bands as lambda**psf_wavelength_power.
    psf_wavelength_power: exponent of that wavelength scaling (Xin et al. 2018).
    max_jitter: the crop centre moves by integers from U(-max_jitter, max_jitter) per axis.
    crop_size: side of the centre crop the network sees, pixels.
    noise_scale_min, noise_scale_max: gamma_c = U(min, max) x the band's MAD.
    enabled: the augmentations applied, by name (:data:`AUGMENTATIONS`).
    """

    max_ebv: float
    psf_sigma_r_arcsec: float
    psf_wavelength_power: float
    max_jitter: int
    crop_size: int
    noise_scale_min: float
    noise_scale_max: float
    enabled: tuple[str, ...]

    def __post_init__(self):
        _check(self.max_ebv >= 0, f"augment.max_ebv must be non-negative, got {self.max_ebv}")
        _check(self.psf_sigma_r_arcsec >= 0,
               f"augment.psf_sigma_r_arcsec must be non-negative, got {self.psf_sigma_r_arcsec}")
        _check(self.max_jitter >= 0, f"augment.max_jitter must be non-negative, got {self.max_jitter}")
        _check(self.crop_size >= 1, f"augment.crop_size must be positive, got {self.crop_size}")
        # the jittered crop must stay inside the 107x107 cutout (Appendix A)
        from sdsscl.constants import CUTOUT_SIZE

        _check(self.crop_size + 2 * self.max_jitter <= CUTOUT_SIZE,
               f"augment.crop_size + 2 * max_jitter = {self.crop_size + 2 * self.max_jitter} "
               f"exceeds the {CUTOUT_SIZE}-pixel cutout")
        _check(0 <= self.noise_scale_min <= self.noise_scale_max,
               f"augment.noise_scale_min <= noise_scale_max must hold, got "
               f"{self.noise_scale_min} > {self.noise_scale_max}")
        unknown = sorted(set(self.enabled) - set(AUGMENTATIONS))
        _check(not unknown, f"augment.enabled names unknown augmentations {unknown}; known: {list(AUGMENTATIONS)}")
        _check(len(set(self.enabled)) == len(self.enabled), f"augment.enabled repeats a name: {list(self.enabled)}")


#: Encoder depths: torchvision's ResNets (Appendix E.1 uses resnet50).
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50")


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder network (Appendix E.1; built by :func:`sdsscl.models.build_encoder`).

    arch: torchvision ResNet depth (``resnet50`` in the paper).
    stem_stride: stride of ``conv1`` (1 in the paper, which also drops the max-pool; 2 makes
        every later activation 4x smaller, a CPU-friendly variant).
    in_channels: input bands (5, ugriz).
    width: channels of the stem and first stage (64 in torchvision and the paper); every stage
        scales with it, the cost as its square; the representation has 8 x width x expansion
        dimensions (2048 for the paper's ResNet50).
    projection_dim: output of the two-layer MLP projection head (128, Appendix E.1).
    """

    arch: str = "resnet50"
    stem_stride: int = 1
    in_channels: int = 5
    width: int = 64
    projection_dim: int = 128

    def __post_init__(self):
        _check(self.arch in ARCHS, f"unknown encoder architecture {self.arch!r}; choose one of {list(ARCHS)}")
        _check(self.stem_stride in (1, 2), f"encoder.stem_stride must be 1 (paper) or 2, got {self.stem_stride}")
        _check(self.in_channels >= 1, f"encoder.in_channels must be positive, got {self.in_channels}")
        _check(self.width >= 4 and self.width % 4 == 0,
               f"encoder.width must be a positive multiple of 4, got {self.width}")
        _check(self.projection_dim >= 1, f"encoder.projection_dim must be positive, got {self.projection_dim}")


@dataclass(frozen=True)
class PretrainConfig:
    """MoCo v2 pretraining (Section 2, Appendix E.1); the views come from ``augment``.

    encoder: the network (paper: ResNet50, stride-1 stem, 2048-d, 128-d head).
    epochs: passes over the data (paper: ~50).
    batch_size: images per process and step; the global batch is batch_size x processes
        (paper: 256 in all).
    base_lr: SGD learning rate for a global batch of 256, scaled linearly (paper: 0.03).
    momentum, weight_decay: SGD (MoCo v2: 0.9 and 1e-4).
    queue_size: K, negatives in the queue (paper: ~62k, ~5% of the data); must be a multiple
        of the global batch (checked when training starts, which knows the process count).
    key_momentum: m of theta_k <- m theta_k + (1 - m) theta_q (Eq. E1; paper: 0.999).
    temperature: tau of Eq. 1 (paper: 0.1).
    key_bn_splits: on one process, the shuffled key batch is encoded in this many chunks so
        BatchNorm cannot pair a key with its query (several processes shuffle across ranks).
    checkpoint_every: optimizer steps between checkpoints (also at every epoch end).
    log_every: steps between log rows.
    num_workers: DataLoader processes reading HDF5 (speed only).
    seed: model initialisation, sampler order and augmentation draws.
    """

    encoder: EncoderConfig
    epochs: int
    batch_size: int
    base_lr: float
    momentum: float
    weight_decay: float
    queue_size: int
    key_momentum: float
    temperature: float
    key_bn_splits: int
    checkpoint_every: int = field(metadata={_HASHED: False})
    log_every: int = field(metadata={_HASHED: False})
    num_workers: int = field(metadata={_HASHED: False})
    seed: int

    def __post_init__(self):
        for name in ("epochs", "batch_size", "queue_size", "key_bn_splits", "checkpoint_every",
                     "log_every"):
            _check(getattr(self, name) >= 1, f"pretrain.{name} must be at least 1, got {getattr(self, name)}")
        _check(self.base_lr > 0, f"pretrain.base_lr must be positive, got {self.base_lr}")
        _check(self.temperature > 0, f"pretrain.temperature must be positive, got {self.temperature}")
        _check(0 <= self.key_momentum < 1, f"pretrain.key_momentum must lie in [0, 1), got {self.key_momentum}")
        _check(self.momentum >= 0 and self.weight_decay >= 0,
               "pretrain.momentum and pretrain.weight_decay must be non-negative")
        _check(self.num_workers >= 0, f"pretrain.num_workers must be non-negative, got {self.num_workers}")
        _check(self.seed >= 0, f"pretrain.seed must be non-negative, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self, hashed_only=False)


#: Where the representation maps and searches run (``representations`` section).
SEARCH_INDEXES: tuple[str, ...] = ("flat", "ivf", "hnsw")


@dataclass(frozen=True)
class RepresentationsConfig:
    """Representations of every galaxy, similarity search and maps (Section 3.1, Appendix B).

    batch_size: images per forward pass when extracting (speed only).
    dtype: storage of the vectors on disk, ``float16`` (half the size; cosine similarities
        change by ~1e-3, far below the gaps between neighbours) or ``float32``.
    search_index: faiss index of the book's searches: ``flat`` (exact, the paper's brute-force
        cosine search), ``ivf`` or ``hnsw`` (approximate, for millions of galaxies).
    ivf_nlist, ivf_nprobe: IVF cells, and cells visited per query.
    hnsw_m: HNSW links per node.
    neighbours: k, the nearest neighbours shown per query (Figure 7: 5) and scored.
    anomaly_k: the anomaly score is the cosine distance to the k-th nearest neighbour.
    umap_fit_fraction: fraction of galaxies the UMAP is fitted on, then applied to all
        (Appendix B.2: 5%); at least ``umap_min_fit`` galaxies.
    umap_min_fit: smallest UMAP fit sample.
    umap_n_neighbors, umap_min_dist: UMAP settings (umap-learn's defaults: 15, 0.1).
    mosaic_cells: cells per side of the Figure 2 image mosaic.
    stationarity_galaxies: galaxies followed under augmentations (Figure 9: 10).
    """

    batch_size: int = field(metadata={_HASHED: False})
    dtype: Literal["float16", "float32"]
    search_index: Literal["flat", "ivf", "hnsw"]
    ivf_nlist: int
    ivf_nprobe: int
    hnsw_m: int
    neighbours: int
    anomaly_k: int
    umap_fit_fraction: float
    umap_min_fit: int
    umap_n_neighbors: int
    umap_min_dist: float
    mosaic_cells: int
    stationarity_galaxies: int

    def __post_init__(self):
        for name in ("batch_size", "ivf_nlist", "ivf_nprobe", "hnsw_m", "neighbours", "anomaly_k",
                     "umap_min_fit", "umap_n_neighbors", "mosaic_cells", "stationarity_galaxies"):
            _check(getattr(self, name) >= 1, f"representations.{name} must be at least 1, got {getattr(self, name)}")
        _check(self.ivf_nprobe <= self.ivf_nlist,
               f"representations.ivf_nprobe ({self.ivf_nprobe}) cannot exceed ivf_nlist ({self.ivf_nlist})")
        _check(0 < self.umap_fit_fraction <= 1,
               f"representations.umap_fit_fraction must lie in (0, 1], got {self.umap_fit_fraction}")
        _check(self.umap_min_dist >= 0, f"representations.umap_min_dist must be non-negative, got {self.umap_min_dist}")


#: Optimizers of the downstream training schedules.
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class ScheduleConfig:
    """How one downstream network is trained (Appendix C.2, E.2); shared by the supervised
    CNN and the fine-tuned encoder.

    optimizer: ``sgd`` (momentum 0.9; Appendix C.2) or ``adam`` (Appendix E.2 gives only the
        learning rates; Pasquet et al. 2019 used Adam).
    lr: learning rate of the network trained from scratch, and of the new head when fine-tuning.
    encoder_lr_factor: when fine-tuning, the pretrained weights train at lr x this (paper: 0.1).
    weight_decay: L2 penalty.
    epochs: passes over the training labels (paper: 100).
    min_steps: at least this many optimizer steps, whatever the label count (a run on 256
        labels would otherwise take a handful of steps); the epochs grow to reach it.
    max_steps: at most this many steps (null: no cap); the epochs shrink to fit it.
    milestones: fractions of training at which the learning rate drops 10x (paper: 60 and 90
        of 100 epochs).
    batch_size: images per step (paper: 128 morphology, 256 photo-z).
    head_init: the new head of a fine-tuned encoder starts ``random`` (the paper) or from the
        linear probe fitted on the training labels' representations (``probe``; "LP-FT",
        Kumar et al. 2022), with the probe itself as step 0 of the model selection.
    """

    optimizer: Literal["sgd", "adam"]
    lr: float
    encoder_lr_factor: float
    weight_decay: float
    epochs: int
    min_steps: int
    max_steps: int | None
    milestones: tuple[float, ...]
    batch_size: int
    head_init: Literal["random", "probe"] = "random"

    def __post_init__(self):
        _check(self.lr > 0, f"lr must be positive, got {self.lr}")
        _check(0 < self.encoder_lr_factor <= 1, f"encoder_lr_factor must lie in (0, 1], got {self.encoder_lr_factor}")
        _check(self.weight_decay >= 0, f"weight_decay must be non-negative, got {self.weight_decay}")
        _check(self.epochs >= 1 and self.min_steps >= 1 and self.batch_size >= 1,
               "epochs, min_steps and batch_size must be at least 1")
        _check(self.max_steps is None or self.max_steps >= self.min_steps,
               f"max_steps ({self.max_steps}) must be null or at least min_steps ({self.min_steps})")
        _check(all(0 < m < 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
               f"milestones must be increasing fractions in (0, 1), got {list(self.milestones)}")


@dataclass(frozen=True)
class ProbeConfig:
    """The linear classifier on frozen representations (Appendix C.2).

    lr: LBFGS learning rate (paper: 0.05), divided by 10 at each of ``milestones`` (epochs;
        paper: 10 and 25).
    epochs: LBFGS epochs (full-batch; each runs ``max_iter`` iterations).
    max_iter: LBFGS iterations per epoch.
    weight_decay: L2 penalty on the weights (paper: none stated).
    """

    lr: float
    epochs: int
    milestones: tuple[int, ...]
    max_iter: int
    weight_decay: float

    def __post_init__(self):
        _check(self.lr > 0 and self.epochs >= 1 and self.max_iter >= 1,
               "probe lr, epochs and max_iter must be positive")
        _check(self.weight_decay >= 0, f"probe weight_decay must be non-negative, got {self.weight_decay}")


@dataclass(frozen=True)
class MorphologyConfig:
    """Galaxy Zoo 2 morphology (Section 3.2, Appendix C).

    questions: the GZ2 questions (:mod:`sdsscl.gz2`; paper: smooth, edge_on, bar).
    label_counts: training-label counts of the sweep; every question also runs with all
        its labels. Counts above a question's labelled training set are skipped (and said so).
    repeats: seeds per point for label counts up to ``repeat_up_to`` (spread shown).
    repeat_up_to: the largest label count that is repeated.
    supervised: the CNN from scratch (paper: SGD 0.01, 100 epochs, steps at 60 and 90).
    finetune: the pretrained encoder with a new head (paper: as supervised, encoder 10x smaller lr).
    probe: the linear classifier on the representations.
    """

    questions: tuple[str, ...]
    label_counts: tuple[int, ...]
    repeats: int
    repeat_up_to: int
    supervised: ScheduleConfig
    finetune: ScheduleConfig
    probe: ProbeConfig

    def __post_init__(self):
        from sdsscl.gz2 import QUESTIONS

        unknown = [q for q in self.questions if q not in QUESTIONS]
        _check(not unknown, f"morphology.questions names unknown GZ2 questions {unknown}; known: {list(QUESTIONS)}")
        _check(all(n >= 2 for n in self.label_counts) and list(self.label_counts) == sorted(set(self.label_counts)),
               f"morphology.label_counts must be increasing counts of at least 2, got {list(self.label_counts)}")
        _check(self.repeats >= 1, f"morphology.repeats must be at least 1, got {self.repeats}")


@dataclass(frozen=True)
class PhotozConfig:
    """Photometric redshifts (Section 3.3, Appendix E.2; Pasquet et al. 2019).

    bins: redshift classes (paper: 180), equal width on [0, z_max].
    z_max: upper end of the binned range (paper: 0.4); larger spec-z are clipped into the last bin.
    fractions: fractions of the training labels of the sweep (paper: 0.1 ... 1.0).
    repeats: seeds per fraction up to ``repeat_up_to``.
    repeat_up_to: the largest fraction that is repeated.
    supervised: the CNN from scratch.
    finetune: the pretrained encoder (paper: Adam-style lr 1e-4 encoder, 1e-3 head).
    probe: the linear probe that starts the fine-tuned head when ``finetune.head_init`` is
        ``probe`` (the ablation's fine-tuning uses it too).
    photometry_neighbours: k of the photometry-only reference, chosen on the validation set
        among these values (k-nearest neighbours on catalogue magnitude and colours).
    """

    bins: int
    z_max: float
    fractions: tuple[float, ...]
    repeats: int
    repeat_up_to: float
    supervised: ScheduleConfig
    finetune: ScheduleConfig
    probe: ProbeConfig
    photometry_neighbours: tuple[int, ...]

    def __post_init__(self):
        _check(self.bins >= 2, f"photoz.bins must be at least 2, got {self.bins}")
        _check(self.z_max > 0, f"photoz.z_max must be positive, got {self.z_max}")
        _check(all(0 < f <= 1 for f in self.fractions) and list(self.fractions) == sorted(set(self.fractions)),
               f"photoz.fractions must be increasing fractions in (0, 1], got {list(self.fractions)}")
        _check(self.repeats >= 1, f"photoz.repeats must be at least 1, got {self.repeats}")
        _check(len(self.photometry_neighbours) >= 1 and all(k >= 1 for k in self.photometry_neighbours),
               "photoz.photometry_neighbours must list positive k")


@dataclass(frozen=True)
class AblationConfig:
    """The augmentation ablation (Appendix D, Figure 13).

    subsets: augmentation sets pretrained (names of :data:`AUGMENTATIONS`).
    epochs: pretraining epochs of each subset (the main run's ``pretrain.epochs`` in the
        paper; fewer at CPU scale).
    fractions: fractions of the photo-z training labels each subset is fine-tuned on (paper:
        0.1, 0.2, 0.3).
    finetune: the photo-z fine-tuning schedule.
    """

    subsets: tuple[tuple[str, ...], ...]
    epochs: int
    fractions: tuple[float, ...]
    finetune: ScheduleConfig

    def __post_init__(self):
        for subset in self.subsets:
            unknown = sorted(set(subset) - set(AUGMENTATIONS))
            _check(not unknown and subset, f"ablation.subsets: {list(subset)} names unknown augmentations {unknown}")
        _check(len({frozenset(s) for s in self.subsets}) == len(self.subsets), "ablation.subsets repeat a set")
        _check(self.epochs >= 1, f"ablation.epochs must be at least 1, got {self.epochs}")
        _check(all(0 < f <= 1 for f in self.fractions), f"ablation.fractions must lie in (0, 1], got {list(self.fractions)}")


@dataclass(frozen=True)
class BookConfig:
    """How the book draws what it shows (presentation only, never a result).

    dpi: resolution of saved and displayed figures.
    sky_max_points: most galaxies drawn per panel of a sky map.
    gallery_per_cell: galaxies per (morphology, redshift) cell of the image gallery.
    gallery_redshift_bins: redshift bin edges of the gallery.
    """

    dpi: int
    sky_max_points: int
    gallery_per_cell: int
    gallery_redshift_bins: tuple[float, ...]

    def __post_init__(self):
        _check(20 <= self.dpi <= 600, f"book.dpi must lie in [20, 600], got {self.dpi}")
        _check(self.sky_max_points >= 1, f"book.sky_max_points must be positive, got {self.sky_max_points}")
        _check(self.gallery_per_cell >= 1, f"book.gallery_per_cell must be positive, got {self.gallery_per_cell}")
        edges = self.gallery_redshift_bins
        _check(len(edges) >= 2 and all(a < b for a, b in zip(edges, edges[1:])),
               f"book.gallery_redshift_bins must be at least two increasing edges, got {list(edges)}")


# --------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class Profile:
    """A resolved profile: the complete settings of one run of the book.

    name: the profile file it came from (``smoke``, ``default``, ``paper``).
    description: one line for people.
    seed: seed of everything a notebook draws at random outside the sections' own
        seeds (subsamples, galleries).
    mock: the mock survey (``null`` when the data are the real files).
    overrides: the dotted-key overrides applied on top of the file, as given.
    """

    name: str
    description: str = field(metadata={_HASHED: False})
    seed: int
    mock: MockConfig | None
    data: DataConfig
    augment: AugmentConfig
    pretrain: PretrainConfig
    representations: RepresentationsConfig
    morphology: MorphologyConfig
    photoz: PhotozConfig
    ablation: AblationConfig
    book: BookConfig
    overrides: dict[str, Any] = field(default_factory=dict, metadata={_HASHED: False})

    def __post_init__(self):
        _check(self.seed >= 0, f"seed must be non-negative, got {self.seed}")
        _check((self.mock is not None) == (self.data.source == "mock"),
               "a profile needs a mock section exactly when data.source is 'mock'")

    # -- identity
    def to_dict(self, hashed_only: bool = False) -> dict[str, Any]:
        """Plain nested dict of the settings (tuples as lists), as YAML would hold them."""
        return _to_plain(self, hashed_only)

    def config_hash(self) -> str:
        """Stable SHA-256 (hex, 12 digits) of the settings that can change a result."""
        text = json.dumps(self.to_dict(hashed_only=True), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        """Folder name under ``runs/``: the profile name, plus the hash when overridden.

        Overridden runs get a folder of their own, so that, say, a different mock seed
        never overwrites the profile's own artifacts.
        """
        return self.name if not self.overrides else f"{self.name}-{self.config_hash()}"

    def upstream_hash(self) -> str:
        """Stable hash (12 hex digits) of the settings in :data:`UPSTREAM`: those that make the
        data, the splits, the pretrained encoder and its representations."""
        plain = self.to_dict(hashed_only=True)
        picked = {key: _pick(plain, key) for key in UPSTREAM}
        text = json.dumps(picked, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def upstream_name(self) -> str:
        """Folder name under ``runs/`` of the upstream artifacts (mock, splits, band MAD,
        pretraining checkpoint, representations).

        It is the profile's own folder when the overrides touch only downstream settings
        (``--set photoz.finetune.max_steps=1000``), so that such a run reuses the profile's
        pretraining instead of repeating it; otherwise ``<name>-<upstream hash>``, shared by
        every run with the same upstream settings.
        """
        if not any(_is_upstream(key) for key in self.overrides):
            return self.name
        return f"{self.name}-{self.upstream_hash()}"

    def flat(self) -> dict[str, Any]:
        """The settings as ``{"section.key": value}`` (for tables)."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", {k: v for k, v in self.to_dict().items() if k != "overrides"})
        return out


# --------------------------------------------------------------------------- loading
def project_root() -> Path:
    """The sdsscl checkout: ``$SDSSCL_ROOT``, else the nearest folder above the working
    directory (or above this file) that holds ``profiles/`` and ``pyproject.toml``."""
    env = os.environ.get("SDSSCL_ROOT")
    if env:
        return Path(env).resolve()
    for start in (Path.cwd().resolve(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if (folder / "profiles").is_dir() and (folder / "pyproject.toml").is_file():
                return folder
    raise ConfigError("cannot find the sdsscl project root (a folder with profiles/ and pyproject.toml); "
                      "set SDSSCL_ROOT")


def profile_path(name: str, root: Path | None = None) -> Path:
    """The YAML file of profile ``name`` (or ``name`` itself if it is a path to one)."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    path = (root or project_root()) / "profiles" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ConfigError(f"unknown profile {name!r}; profiles: {known}")
    return path


def _read_yaml(name: str, root: Path | None, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = profile_path(name, root)
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    _check(isinstance(raw, dict), f"{path}: a profile is a mapping, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    _check(parent not in seen + (name,), f"{path}: circular 'extends' through {parent!r}")
    return _merge(_read_yaml(parent, root, seen + (name,)), raw)


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set each dotted key of ``overrides`` in a nested profile dict (a new dict).

    Only keys that already exist may be set; a section may be replaced whole
    (``{"mock": None}``) or key by key (``{"mock.seed": 7}``).
    """
    out = _merge({}, raw)
    for dotted, value in overrides.items():
        _check(isinstance(dotted, str) and dotted, f"override keys are dotted strings, got {dotted!r}")
        *parents, leaf = dotted.split(".")
        node = out
        for i, part in enumerate(parents):
            child = node.get(part) if isinstance(node, dict) else None
            _check(isinstance(child, dict), f"override {dotted!r}: {'.'.join(parents[:i + 1])!r} is not a section")
            node[part] = child = dict(child)
            node = child
        _check(leaf in node, f"override {dotted!r}: unknown key {leaf!r}; keys here: {sorted(node)}")
        node[leaf] = value
    return out


def load_profile(name: str = "default", overrides: Mapping[str, Any] | None = None,
                 root: Path | None = None) -> Profile:
    """Read, merge, override and validate profile ``name``.

    ``overrides`` maps dotted keys to values: ``{"mock.n_galaxies": 500, "seed": 7}``.
    """
    overrides = dict(overrides or {})
    raw = apply_overrides(_read_yaml(name, root), overrides)
    _check("name" not in raw and "overrides" not in raw,
           f"profile {name!r}: 'name' and 'overrides' are set by the loader, not the file")
    raw["name"] = Path(name).stem
    raw["overrides"] = overrides
    return _build(Profile, raw, "")


def parse_override(text: str) -> tuple[str, Any]:
    """``"mock.seed=7"`` -> ``("mock.seed", 7)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    _check(bool(sep) and bool(key.strip()), f"an override reads KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


# --------------------------------------------------------------------------- typed build
def _build(cls: type, raw: Any, where: str) -> Any:
    _check(isinstance(raw, Mapping), f"{where or 'profile'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    _check(not unknown, f"{where or 'profile'}: unknown keys {unknown}; allowed: {sorted(fields)}")
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in raw:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            _check(has_default, f"{key}: missing (every profile spells out every setting)")
            continue
        values[name] = _coerce(hints[name], raw[name], key)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        _check(value is not None, f"{key}: may not be null")
        errors = []
        for option in options:
            try:
                return _coerce(option, value, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        _check(value in args, f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        _check(isinstance(value, Mapping), f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        _check(isinstance(value, bool), f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        _check(isinstance(value, str), f"{key}: expected a string, got {value!r}")
        return value
    if hint is Any:
        return value
    raise TypeError(f"{key}: unsupported annotation {hint!r}")  # a programming error, not a user's


#: Settings that make the upstream artifacts shared by the downstream chapters (the mock, the
#: splits and band MAD, the MoCo checkpoint, the stored representations), as dotted prefixes.
UPSTREAM: tuple[str, ...] = ("mock", "data", "augment", "pretrain", "representations.dtype")


def _is_upstream(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") or p.startswith(key + ".") for p in UPSTREAM)


def _pick(plain: Mapping[str, Any], dotted: str) -> Any:
    value: Any = plain
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _to_plain(obj: Any, hashed_only: bool) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name), hashed_only)
                for f in dataclasses.fields(obj)
                if not hashed_only or f.metadata.get(_HASHED, True)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v, hashed_only) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v, hashed_only) for k, v in obj.items()}
    return obj
