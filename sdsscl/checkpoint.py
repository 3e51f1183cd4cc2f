"""Checkpoints: atomic saving, safe loading, and reading the authors' released models.

Every checkpoint is loaded with ``torch.load(weights_only=True)``: a file holding arbitrary
pickled objects is refused. Layouts understood by :func:`load_encoder`:

* MoCo (the authors' ``pretrained_paper_model.pth.tar`` and sdsscl's own pretraining):
  ``{'epoch', 'arch', 'state_dict': {'module.encoder_q.*', 'module.encoder_k.*',
  'module.queue', ...}, 'optimizer'}``;
* the authors' supervised / fine-tuned photo-z models: ``{'model_state': {'module.*'}}``;
* a bare state dict of the encoder.

The classification or projection head (``fc.*``) is dropped: what is loaded is the encoder up
to the average pool, whose output is the representation.
"""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .models import EncoderConfig, build_encoder

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save_atomic(obj, path) -> Path:
    """``torch.save`` to a temporary name in the same folder, then rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_safe(path, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(torch.load(weights_only=True) rejected it: {str(e).splitlines()[0]})") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dict of tensors (got {type(obj).__name__})")
    return obj


@dataclass
class LoadReport:
    """What :func:`load_encoder` found: the layout and the keys that did not line up."""

    path: Path
    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    epoch: int | None = None

    def __str__(self):
        return (f"{self.path.name}: {self.layout} layout, epoch {self.epoch}, "
                f"{len(self.missing)} missing keys {self.missing[:5]}, "
                f"{len(self.unexpected)} unexpected keys {self.unexpected[:5]}")


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def encoder_state(ckpt: dict, path: Path) -> tuple[dict, str]:
    """The query encoder's state dict (``fc`` included) from any supported layout."""
    if "state_dict" in ckpt:
        state = ckpt["state_dict"]
        for prefix in ("module.encoder_q.", "encoder_q."):
            enc = _strip(state, prefix)
            if enc:
                return enc, "moco"
        raise CheckpointError(f"{path}: 'state_dict' has no encoder_q.* keys "
                              f"(first keys: {list(state)[:3]})")
    if "model_state" in ckpt:
        state = ckpt["model_state"]
        enc = _strip(state, "module.") or state
        return enc, "supervised"
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _strip(ckpt, "module.") or ckpt, "state_dict"
    raise CheckpointError(f"{path}: unknown checkpoint layout (keys: {list(ckpt)[:6]}); expected "
                          "'state_dict' (MoCo), 'model_state' (supervised) or a bare state dict")


def load_encoder(path, cfg: EncoderConfig, map_location="cpu") -> tuple[nn.Module, LoadReport]:
    """Build the encoder of ``cfg`` and fill it from a checkpoint, reporting what did not match.

    Raises :class:`CheckpointError` if a tensor's shape differs (a checkpoint from another
    architecture) or if hardly any weights match.
    """
    path = Path(path)
    ckpt = load_safe(path, map_location)
    state, layout = encoder_state(ckpt, path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    enc = build_encoder(cfg, head=False)
    own = enc.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(v.shape)} but the {cfg.arch} encoder "
                f"(stem stride {cfg.stem_stride}, {cfg.in_channels} bands) expects "
                f"{tuple(own[k].shape)}: the checkpoint is from a different architecture")
    result = enc.load_state_dict(state, strict=False)
    report = LoadReport(path=path, layout=layout, missing=list(result.missing_keys),
                        unexpected=list(result.unexpected_keys), epoch=ckpt.get("epoch"))
    if len(report.missing) > len(own) // 2:
        raise CheckpointError(f"{path}: only {len(own) - len(report.missing)} of {len(own)} "
                              f"encoder tensors found; is it a {cfg.arch} checkpoint? ({report})")
    if report.missing or report.unexpected:
        log.warning("loaded with mismatches: %s", report)
    return enc, report
