"""The numpy inference snapshot equals FusionNet in eval mode."""
import numpy as np
import pytest
import torch

from titan_fusion.server.fusion import RunningNorm
from titan_fusion.server.inference import NumpyNet
from titan_fusion.server.model import FusionNet, NetConfig


@pytest.mark.parametrize("n_experts, n_features, heads, skill, pool", [
    (4, 3, 2, False, False), (4, 0, 2, False, False), (6, 5, 4, False, False), (1, 1, 1, False, False),
    (4, 3, 2, True, False), (4, 3, 2, False, True), (4, 3, 2, True, True), (4, 0, 2, True, True),
    (7, 3, 2, True, "no-identity")])
def test_snapshot_equals_torch_eval_to_1e6(n_experts, n_features, heads, skill, pool):
    torch.manual_seed(7)
    net = FusionNet(NetConfig(n_experts, n_features, hidden_dim=32, num_heads=heads, dropout=0.2,
                              skill_bias=skill, logit_pool=bool(pool), expert_identity=pool != "no-identity"))
    with torch.no_grad():  # move every weight off its init (the query starts at 0)
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    net.eval()
    g = torch.Generator().manual_seed(1)
    B = 64
    x = torch.stack((torch.randn(B, n_experts, generator=g) * 3, torch.rand(B, n_experts, generator=g),
                     (torch.rand(B, n_experts, generator=g) > 0.5).float()), dim=-1)
    raw = torch.randn(B, n_features, generator=g, dtype=torch.float64) * 100 + 50_000
    norm = RunningNorm(n_features, 1000)
    for row in raw:
        norm.update(row)
    shift, scale = norm.shift_scale()
    f = RunningNorm.apply(raw, shift, scale) if n_features else None
    logw = torch.log_softmax(torch.randn(B, n_experts, generator=g, dtype=torch.float64) * 2, dim=-1)
    sk = logw.float() if skill else None
    with torch.no_grad():
        logits, w, _ = net(x, f, skill=sk)
    ref_p = torch.softmax(logits.double(), dim=-1)[:, 0].numpy()
    snap = NumpyNet.of(net, shift.numpy(), scale.numpy())
    p, a = snap.forward(x.double().numpy(), raw.numpy(), logw.float().double().numpy() if skill else None)
    assert np.abs(p - ref_p).max() < 1e-6
    assert np.abs(a - w.double().numpy()).max() < 1e-6
    assert np.allclose(a.sum(axis=1), 1.0, atol=1e-12)
    # and in float64 the two agree to rounding
    net64 = net.double()
    with torch.no_grad():
        f64 = ((raw - shift) * scale).clamp(-5.0, 5.0) if n_features else None  # unrounded features
        l64, w64, _ = net64(x.double(), f64, skill=sk.double() if skill else None)
    assert np.abs(p - torch.softmax(l64, dim=-1)[:, 0].numpy()).max() < 1e-12


def test_snapshot_is_immutable():
    net = FusionNet(NetConfig(2, 1))
    snap = NumpyNet.of(net, np.zeros(1), np.ones(1))
    with pytest.raises(ValueError):
        snap.w["head"][0] = 1.0
    with pytest.raises(AttributeError):
        snap.n_head = 4
