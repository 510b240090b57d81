import pytest
import torch

from genie_fast.models.unet import CONFIGS, UNet, UNetConfig, count_parameters, timestep_embedding


def _randomize(model, std=0.1, seed=0):
    # The output conv and residual branches start at zero; random weights make tests meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (3, 1, 32, 32), (1, 3, 16, 16)])
def test_shapes_and_features(shape):
    b, c, h, w = shape
    cfg = UNetConfig(in_channels=c, image_size=h, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(h // 2,))
    m = _randomize(UNet(cfg)).eval()
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
    _randomize(m)
    assert torch.allclose(m(x, torch.tensor(0.5)), m(x, torch.full((2,), 0.5)))


def test_batch_items_independent():
    m = _randomize(UNet("tiny")).eval()
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.2, 0.5, 1.0])
    full = m(x, t)
    for i in range(4):
        assert torch.allclose(full[i:i + 1], m(x[i:i + 1], t[i:i + 1]), atol=1e-5)


def test_time_conditioning_uses_999t():
    t = torch.tensor([0.001, 1.0])
    emb = timestep_embedding(t, 8)
    # first frequency is 1: sin(999 t)
    assert torch.allclose(emb[:, 0], torch.sin(999.0 * t), atol=1e-5)
    m = _randomize(UNet("tiny")).eval()
    x = torch.randn(1, 1, 8, 8)
    assert not torch.allclose(m(x, torch.tensor([0.1])), m(x, torch.tensor([0.2])))


def test_gradients_flow_everywhere():
    m = _randomize(UNet("tiny"))
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
