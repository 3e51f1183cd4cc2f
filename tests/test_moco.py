"""MoCo v2, the encoders and checkpoints (paper Section 2, Appendix E.1)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sdsscl.checkpoint import CheckpointError, load_encoder, load_safe, save_atomic
from sdsscl.config import ConfigError, EncoderConfig
from sdsscl.models import build_encoder
from sdsscl.moco import MoCo, check_queue_size, info_nce_loss

SMALL = EncoderConfig(arch="resnet18", stem_stride=2, projection_dim=16)


def test_loss_equals_equation_1_on_known_inputs():
    torch.manual_seed(0)
    q = torch.randn(3, 4)
    k = torch.randn(3, 4)
    queue = F.normalize(torch.randn(4, 5), dim=0)
    tau = 0.1
    loss, logits = info_nce_loss(q, k, queue, tau)

    def sim(a, b):  # the paper's sim(a, b) = a.b / (tau |a| |b|)
        return float(a @ b / (tau * a.norm() * b.norm()))

    expected = 0.0
    for i in range(3):
        pos = math.exp(sim(q[i], k[i]))
        neg = sum(math.exp(sim(q[i], queue[:, j])) for j in range(5))
        expected += -math.log(pos / (pos + neg))
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)
    assert logits.shape == (3, 6)


def test_loss_is_computed_in_float32_under_bfloat16_autocast():
    # On a GPU the encoders run under bfloat16 autocast; the similarities must not: rounded to
    # bfloat16, logits near 1/tau = 10 move in steps of 1/16 and near-ties become ties.
    torch.manual_seed(1)
    # encoder outputs close to each other: in bfloat16, 28 of these 64 positives would tie their
    # hardest negative
    q = (torch.randn(64, 32) + 10).bfloat16()
    k = (torch.randn(64, 32) + 10).bfloat16()
    queue = F.normalize(torch.randn(32, 512) + 10, dim=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = info_nce_loss(q, k, queue, 0.1)
    ref_loss, ref_logits = info_nce_loss(q.float(), k.float(), queue, 0.1)   # no autocast
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    # what bfloat16 logits would have lost: most distinct similarities merge into a few steps
    assert len(torch.unique(logits)) > 10 * len(torch.unique(logits.bfloat16()))
    hardest = logits[:, 1:].max(dim=1).values
    assert not torch.any(logits[:, 0] == hardest)                  # no positive ties its hardest negative


def test_resnet50_gives_2048d_with_paper_stem():
    enc = build_encoder(EncoderConfig())
    assert enc.conv1.stride == (1, 1) and enc.conv1.in_channels == 5
    assert enc.conv1.kernel_size == (7, 7) and enc.conv1.padding == (3, 3)
    assert isinstance(enc.maxpool, torch.nn.Identity)
    enc.eval()
    with torch.no_grad():
        # the stride-1 stem keeps 64x64 through layer1 (4x wider than torchvision's default)
        x = torch.randn(2, 5, 64, 64)
        h = enc.layer1(enc.relu(enc.bn1(enc.conv1(x))))
        assert h.shape[-2:] == (64, 64)
        assert enc(x).shape == (2, 2048)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ConfigError, match="resnet51"):
        EncoderConfig(arch="resnet51")


def test_momentum_update_exact_and_key_encoder_has_no_gradients():
    model = MoCo(SMALL, queue_size=8, key_momentum=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    before_q = [p.detach().clone() for p in model.encoder_q.parameters()]
    before_k = [p.detach().clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for pq, pk0, pk in zip(before_q, before_k, model.encoder_k.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
    assert all(not p.requires_grad for p in model.encoder_k.parameters())
    x = torch.randn(4, 5, 32, 32)
    loss, _ = model(x, x + 0.01, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in model.encoder_k.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder_q.parameters())


def test_queue_enqueue_order_and_wraparound():
    model = MoCo(SMALL, queue_size=6)
    keys = [F.normalize(torch.randn(2, 16), dim=1) for _ in range(4)]
    for k in keys:
        model.dequeue_and_enqueue(k)
    # 4 batches of 2 into K=6: the 4th batch overwrote slots 0-1, pointer back to 2
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.queue[:, 0:2], keys[3].T)
    torch.testing.assert_close(model.queue[:, 2:4], keys[1].T)
    torch.testing.assert_close(model.queue[:, 4:6], keys[2].T)


def test_queue_size_must_divide_global_batch_with_suggestion():
    check_queue_size(61952, 256)
    with pytest.raises(ValueError, match="61952"):
        check_queue_size(62000, 256)  # the paper's "62k": 61,952 = 242 x 256 is nearest


def _authors_style_checkpoint(model: MoCo) -> dict:
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    return {"epoch": 49, "arch": "resnet18", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0, 1]}]}}


def test_authors_moco_layout_loads_and_gives_same_representation(tmp_path):
    torch.manual_seed(1)
    model = MoCo(SMALL, queue_size=8)
    path = save_atomic(_authors_style_checkpoint(model), tmp_path / "pretrained_paper_model.pth.tar")
    enc, report = load_encoder(path, SMALL)
    assert report.layout == "moco" and not report.missing and not report.unexpected
    x = torch.randn(3, 5, 64, 64)
    ref = build_encoder(SMALL)
    ref.load_state_dict({k: v for k, v in model.encoder_q.state_dict().items()
                         if not k.startswith("fc.")})
    enc.eval(); ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x))


def test_supervised_model_state_layout_loads(tmp_path):
    enc = build_encoder(SMALL)
    state = {f"module.{k}": v for k, v in enc.state_dict().items()}
    state["module.fc.weight"] = torch.randn(180, 512)
    state["module.fc.bias"] = torch.randn(180)
    path = save_atomic({"model_state": state}, tmp_path / "photoz_supervised_baseline_model.pth.tar")
    enc2, report = load_encoder(path, SMALL)
    assert report.layout == "supervised" and not report.missing


def test_checkpoint_from_other_architecture_is_refused(tmp_path):
    model = MoCo(EncoderConfig(arch="resnet18", stem_stride=2, projection_dim=16, in_channels=3),
                 queue_size=8)
    path = save_atomic(_authors_style_checkpoint(model), tmp_path / "rgb.pth.tar")
    with pytest.raises(CheckpointError, match="conv1.weight.*different architecture"):
        load_encoder(path, SMALL)


class Payload:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {}, "hook": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_safe(path)


def test_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth"):
        load_safe(tmp_path / "nope.pth")
