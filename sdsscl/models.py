"""Encoders: torchvision ResNets adapted to 5-band 64x64 galaxy cutouts (paper Appendix E.1).

The paper's encoder is ``torchvision.models.resnet50`` with ``conv1 = Conv2d(5, 64, 7,
stride=1, padding=3)``, no max-pool, and the output of ``AdaptiveAvgPool2d`` — a 2048-d
vector — as the representation. Module names stay torchvision's (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``), so the authors' checkpoints load by name.

CPU profiles use the same code with a cheaper configuration: a smaller depth
(``resnet18``: 512-d representation) and/or a stride-2 stem, which makes every later
activation 4x smaller (the paper chose stride 1 to keep 64x64 inputs wide, at 4x the cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .constants import N_BANDS

ARCHS = ("resnet18", "resnet34", "resnet50")


@dataclass(frozen=True)
class EncoderConfig:
    """The encoder's architecture.

    arch: torchvision ResNet depth (``resnet50`` in the paper, Appendix E.1).
    stem_stride: stride of ``conv1`` (1 in the paper; 2 makes a CPU-friendly variant).
    in_channels: input bands (5, ugriz).
    projection_dim: output of the MoCo v2 two-layer MLP head (128 in the paper).
    """

    arch: str = "resnet50"
    stem_stride: int = 1
    in_channels: int = N_BANDS
    projection_dim: int = 128

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown encoder architecture {self.arch!r}; choose one of {ARCHS}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 (paper) or 2, got {self.stem_stride}")
        if self.in_channels < 1 or self.projection_dim < 1:
            raise ValueError("in_channels and projection_dim must be positive")


def build_resnet(cfg: EncoderConfig) -> nn.Module:
    """A torchvision ResNet with the paper's stem; ``fc`` is an ``Identity`` (representation out)."""
    import torchvision

    net = getattr(torchvision.models, cfg.arch)(weights=None)
    net.conv1 = nn.Conv2d(cfg.in_channels, 64, kernel_size=7, stride=cfg.stem_stride, padding=3,
                          bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def representation_dim(cfg: EncoderConfig) -> int:
    return 2048 if cfg.arch == "resnet50" else 512


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's two-layer MLP head (Chen, X. et al. 2020): Linear, ReLU, Linear.

    Indexed 0 and 2 like the authors' ``fc`` so their ``fc.0.*``/``fc.2.*`` keys line up.
    """
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


def build_encoder(cfg: EncoderConfig, head: bool = False) -> nn.Module:
    """The encoder; with ``head=True`` its ``fc`` is the projection head (MoCo layout)."""
    net = build_resnet(cfg)
    if head:
        net.fc = projection_head(representation_dim(cfg), cfg.projection_dim)
    return net


@torch.no_grad()
def encode(encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Representations (B, D) of a batch (B, C, H, W) in eval mode, on the images' device."""
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder(images)
    finally:
        encoder.train(was_training)
