"""Encoders: torchvision ResNets adapted to 5-band 64x64 galaxy cutouts (paper Appendix E.1).

The paper's encoder is ``torchvision.models.resnet50`` with ``conv1 = Conv2d(5, 64, 7,
stride=1, padding=3)``, no max-pool, and the output of ``AdaptiveAvgPool2d`` — a 2048-d
vector — as the representation. Module names stay torchvision's (``conv1``, ``bn1``,
``layer1``..``layer4``, ``fc``), so the authors' checkpoints load by name.

CPU profiles use the same code with a cheaper configuration: a smaller depth
(``resnet18``), a stride-2 stem, which makes every later activation 4x smaller (the paper chose
stride 1 to keep 64x64 inputs wide, at 4x the cost), and/or a narrower network (``width``, the
channels of the stem and first stage: 64 in torchvision; every stage scales with it, so the
cost falls as width squared and the representation has ``8 * width * expansion`` dimensions).
With the defaults the module is exactly torchvision's ResNet with the paper's stem.
"""
from __future__ import annotations

from torch import nn

from .config import EncoderConfig

_LAYERS = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet34": ("basic", [3, 4, 6, 3]),
           "resnet50": ("bottleneck", [3, 4, 6, 3])}


def _resnet_class():
    from torchvision.models.resnet import ResNet

    class ScaledResNet(ResNet):
        """torchvision's ResNet with every stage's channels scaled by ``width / 64``."""

        def __init__(self, block, layers, width: int):
            self._scale = width / 64
            super().__init__(block, layers)

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:  # first stage: the stem's output width
                self.inplanes = int(64 * self._scale)
            return super()._make_layer(block, int(planes * self._scale), blocks, stride, dilate)

    return ScaledResNet


def build_resnet(cfg: EncoderConfig) -> nn.Module:
    """A torchvision ResNet with the paper's stem; ``fc`` is an ``Identity`` (representation out)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    kind, layers = _LAYERS[cfg.arch]
    net = _resnet_class()(BasicBlock if kind == "basic" else Bottleneck, layers, cfg.width)
    net.conv1 = nn.Conv2d(cfg.in_channels, cfg.width, kernel_size=7, stride=cfg.stem_stride,
                          padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.bn1 = nn.BatchNorm2d(cfg.width)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def representation_dim(cfg: EncoderConfig) -> int:
    """Dimension of the representation: 2048 for the paper's ResNet50."""
    return 8 * cfg.width * (4 if _LAYERS[cfg.arch][0] == "bottleneck" else 1)


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
