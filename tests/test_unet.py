import dataclasses

import pytest
import torch

from _helpers import randomize
from genie_fast.models.unet import CONFIGS, UNet, UNetConfig, count_parameters, log_gamma_vp, time_embedding, timestep_embedding
from genie_fast.schedule import VPSchedule


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (3, 1, 32, 32), (1, 3, 16, 16)])
def test_shapes_and_features(shape):
    b, c, h, w = shape
    cfg = UNetConfig(in_channels=c, image_size=h, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(h // 2,))
    m = randomize(UNet(cfg)).eval()
    x, t = torch.randn(shape), torch.rand(b) * 0.999 + 1e-3
    eps = m(x, t)
    eps2, feats, temb = m(x, t, return_features=True)
    assert eps.shape == x.shape
    assert torch.equal(eps, eps2)
    assert feats.shape == (b, m.feature_channels, h, w)
    assert temb.shape == (b, m.temb_dim)


def test_zero_init_output_and_scalar_t():
    m = UNet("tiny").eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(m(x, torch.full((2,), 0.5))) == 0
    randomize(m)
    assert torch.allclose(m(x, torch.tensor(0.5)), m(x, torch.full((2,), 0.5)))


def test_batch_items_independent():
    m = randomize(UNet("tiny")).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.2, 0.5, 1.0])
    full = m(x, t)
    for i in range(4):
        assert torch.allclose(full[i:i + 1], m(x[i:i + 1], t[i:i + 1]), atol=1e-5)


def test_time_conditioning_uses_999t():
    t = torch.tensor([0.001, 1.0])
    emb = timestep_embedding(t, 8)
    # first frequency is 1: sin(999 t)
    assert torch.allclose(emb[:, 0], torch.sin(999.0 * t), atol=1e-5)
    m = randomize(UNet("tiny")).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(m(x, torch.tensor([0.1])), m(x, torch.tensor([0.2])))


def test_log_gamma_time_input():
    t = torch.tensor([1e-3, 0.01, 0.3, 1.0], dtype=torch.float64)
    assert torch.allclose(log_gamma_vp(t), VPSchedule().gamma(t).log(), rtol=1e-12)
    assert CONFIGS["fmnist_small_lg"].time_input == "log_gamma"
    cfg = dataclasses.replace(CONFIGS["tiny"], time_input="log_gamma")
    a, b = UNet(CONFIGS["tiny"]), UNet(cfg)
    b.load_state_dict(randomize(a).state_dict())  # same parameters, other time features
    x, tt = torch.randn(2, 1, 8, 8), torch.tensor([0.05, 0.7])
    assert not torch.allclose(a(x, tt), b(x, tt))
    # The point of it: at t = 0.3 the features move with t at the speed of log gamma (~5 per unit t),
    # ScoreSDE's at up to 999 per unit t.
    t3 = torch.tensor([0.3])
    speed = {k: torch.func.jvp(lambda s: time_embedding(s, 32, k), (t3,), (torch.ones(1),))[1].abs().max()
             for k in ("999t", "log_gamma")}
    assert speed["log_gamma"] < 6 and speed["999t"] > 500
    with pytest.raises(ValueError, match="unknown time_input"):
        UNetConfig(time_input="t")
    old = CONFIGS["fmnist_small"].to_dict()
    old.pop("time_input")  # files written before the field existed load as ScoreSDE's 999 t
    assert UNetConfig.from_dict(old).time_input == "999t"


def test_gradients_flow_everywhere():
    m = randomize(UNet("tiny"))
    m(torch.randn(2, 1, 8, 8), torch.rand(2)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_named_configs():
    assert count_parameters(UNet("fmnist_small")) == 1_112_801
    with pytest.raises(ValueError, match="unknown UNet config"):
        UNet("nope")
    cfg = CONFIGS["ddpmpp_deep_cifar10"]
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_ddpmpp_deep_cifar10_parameter_count():
    m = UNet("ddpmpp_deep_cifar10")
    assert count_parameters(m) == 104_570_627
    assert m.config.nf == 128 and m.config.ch_mult == (1, 2, 2, 2) and m.config.num_res_blocks == 8
