"""Representations: the encoder's output for every galaxy (Section 3.1).

The preprocessing is the pretraining's without its randomness: the raw 107x107 cutout in
nanomaggies, centre-cropped to the 64x64 the network saw (:class:`sdsscl.augment.CenterCrop`).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .augment import CenterCrop
from .constants import CROP_SIZE


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
