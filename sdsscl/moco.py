"""MoCo v2 (He et al. 2020; Chen, X. et al. 2020) as the paper uses it (Section 2, Appendix E.1).

A query encoder, a key encoder that is a momentum copy of it, and a queue of K keys from past
batches as negatives. Names follow the reference implementation (``encoder_q``,
``encoder_k``, ``queue``, ``queue_ptr``), so checkpoints keep the authors' published layout.
Nothing here assumes a GPU or a process group: with one process it runs on a CPU, with
several (``torch.distributed`` initialised) keys are gathered from all ranks before they enter
the queue, and the key batch is shuffled across ranks for BatchNorm.
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .models import EncoderConfig, build_encoder


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float):
    """InfoNCE (paper Eq. 1) with cosine similarity over temperature.

    q, k: (N, D) query and positive key (normalised here); queue: (D, K) negative keys
    (assumed normalised). Returns (loss, logits (N, 1+K), where column 0 is the positive).

    Computed in float32 even under autocast (the encoders may run in bfloat16 on a GPU): in
    bfloat16 the logits, up to 1 / temperature = 10, would be rounded to steps of 1/16, coarse
    enough to tie many positives with their hardest negative (a quarter of them, measured on the
    default profile's encoder), which blurs the loss and inflates an argmax top-1 accuracy. The
    (N x D) by (D x K) product is small beside the encoders.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(k.float(), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # positive logits: Nx1
        l_neg = torch.einsum("nc,ck->nk", q, queue.float())  # negative logits: NxK
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # Nx(1+K)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits, labels), logits


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from all ranks along dim 0 (no gradient); identity on one process."""
    if _world() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(_world())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


class MoCo(nn.Module):
    """MoCo v2.

    encoder: architecture of both encoders (the paper: ResNet50, stride-1 stem, 128-d head).
    queue_size: K, number of negative keys (paper: ~62k, ~5% of the data; must be a multiple of
        the global batch so the queue wraps at batch boundaries).
    key_momentum: m in theta_k <- m theta_k + (1 - m) theta_q (paper Eq. E1: 0.999).
    temperature: tau in Eq. 1 (paper: 0.1).
    key_bn_splits: on a single process, the shuffled key batch is encoded in this many chunks so
        BatchNorm statistics of a key never come from the same set as its query's (the
        single-process stand-in for shuffle-BN); with several ranks the key batch is shuffled
        across ranks instead and this is ignored.
    """

    def __init__(self, encoder: EncoderConfig, queue_size: int = 65536, key_momentum: float = 0.999,
                 temperature: float = 0.1, key_bn_splits: int = 2, generator_seed: int = 0):
        super().__init__()
        if queue_size < 1 or not 0 <= key_momentum < 1 or temperature <= 0 or key_bn_splits < 1:
            raise ValueError("MoCo needs queue_size >= 1, 0 <= key_momentum < 1, temperature > 0, "
                             f"key_bn_splits >= 1; got K={queue_size}, m={key_momentum}, "
                             f"tau={temperature}, splits={key_bn_splits}")
        self.config = encoder
        self.K = queue_size
        self.m = key_momentum
        self.T = temperature
        self.key_bn_splits = key_bn_splits
        self.encoder_q = build_encoder(encoder, head=True)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        g = torch.Generator().manual_seed(generator_seed)
        queue = torch.randn(encoder.projection_dim, queue_size, generator=g)
        self.register_buffer("queue", F.normalize(queue, dim=0))  # D x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q, on parameters only (as the reference code)."""
        for pk, pq in zip(self.encoder_k.parameters(), self.encoder_q.parameters()):
            pk.mul_(self.m).add_(pq.detach(), alpha=1 - self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Put this step's keys (from every rank) into the queue, oldest first out."""
        keys = gather(keys)
        b = keys.shape[0]
        ptr = int(self.queue_ptr)
        if self.K % b != 0:
            raise ValueError(f"queue size K={self.K} is not a multiple of the global batch {b}")
        self.queue[:, ptr:ptr + b] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + b) % self.K

    @torch.no_grad()
    def _encode_keys(self, im_k: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        world = _world()
        if world > 1:
            # shuffle-BN across ranks (He et al. 2020): each rank encodes a random slice of the
            # global key batch, then the keys are returned to their owners
            x = gather(im_k)
            n = x.shape[0]
            perm = torch.randperm(n, device=x.device)
            dist.broadcast(perm, src=0)
            unperm = torch.argsort(perm)
            rank, b = dist.get_rank(), im_k.shape[0]
            mine = perm.view(world, -1)[rank]
            k = F.normalize(self.encoder_k(x[mine]), dim=1)
            return gather(k)[unperm].view(world, b, -1)[rank]
        n = im_k.shape[0]
        perm = torch.randperm(n, generator=generator).to(im_k.device)
        chunks = [self.encoder_k(c) for c in im_k[perm].chunk(self.key_bn_splits)]
        k = F.normalize(torch.cat(chunks), dim=1)
        return k[torch.argsort(perm)]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor,
                generator: torch.Generator | None = None):
        """One MoCo step's forward: returns (loss, logits). Updates the key encoder first and
        the queue after computing the loss (the reference order)."""
        q = self.encoder_q(im_q)  # N x D
        with torch.no_grad():
            self.momentum_update()
            k = self._encode_keys(im_k, generator)
        loss, logits = info_nce_loss(q, k, self.queue.clone().detach(), self.T)
        self.dequeue_and_enqueue(F.normalize(k.float(), dim=1))
        return loss, logits


def check_queue_size(queue_size: int, global_batch: int) -> None:
    """Raise, suggesting the nearest valid K, unless K is a multiple of the global batch."""
    if global_batch < 1:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if queue_size % global_batch:
        lo = max(global_batch, queue_size // global_batch * global_batch)
        hi = lo + global_batch
        best = lo if queue_size - lo <= hi - queue_size else hi
        raise ValueError(f"queue_size K={queue_size} must be a multiple of the global batch "
                         f"{global_batch} (K % batch == 0, as in MoCo); nearest valid K: {best} "
                         f"(or {lo if best == hi else hi})")
