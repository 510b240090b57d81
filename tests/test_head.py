import json

import pytest
import torch

from _helpers import randomize
from genie_fast.models.default import ModelFileError, load_default, load_model, save_model, default_model_path
from genie_fast.models.head import GenieHead, GenieModel, HeadConfig
from genie_fast.models.unet import UNet, count_parameters
from genie_fast.ops import head_combine_ref
from genie_fast.schedule import VPSchedule


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize(GenieModel(UNet("tiny"))).eval()


def test_head_shapes_and_combination(model):
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1e-3, 0.3, 1.0])
    eps, head_out = model.eps_and_head(x, t)
    assert eps.shape == x.shape and head_out.shape == (3, 3, 8, 8)
    assert torch.equal(eps, model(x, t))
    assert model.image_shape == (1, 8, 8)
    eps2, deps = model.eps_and_deps(x, t)
    gamma = VPSchedule().gamma(t)[:, None, None, None]
    assert torch.equal(eps2, eps)
    torch.testing.assert_close(deps, head_combine_ref(head_out, gamma))


def test_head_input_is_network_eps_and_detached_features(model):
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    eps, feats, temb = model.unet(x, t, return_features=True)
    torch.testing.assert_close(model.eps_and_head(x, t)[1], model.head(x, eps, feats, temb))
    # gradients of the head loss reach only the head
    _, head_out = model.eps_and_head(x, t)
    head_out.square().sum().backward()
    assert all(p.grad is None for p in model.unet.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_head_starts_at_zero_derivative():
    m = GenieModel(randomize(UNet("tiny")))
    _, deps = m.eps_and_deps(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert torch.count_nonzero(deps) == 0


def test_head_is_small_relative_to_unet():
    unet = UNet("fmnist_small")
    head = GenieHead(HeadConfig.for_unet(unet))
    assert count_parameters(head) < 0.05 * count_parameters(unet)


def test_save_load_roundtrip(model, tmp_path):
    stem = save_model(model, tmp_path / "m", provenance={"note": "test"})
    loaded = load_model(str(stem) + ".json")
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    for a, b in zip(model.eps_and_deps(x, t), loaded.eps_and_deps(x, t)):
        torch.testing.assert_close(a, b)
    assert loaded.provenance == {"note": "test"}
    assert loaded.schedule.beta_d == model.schedule.beta_d


def test_load_refuses_mismatch(model, tmp_path):
    stem = save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m.json").read_text())
    cfg["unet"]["nf"] = 16
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="the head reads"):  # a head that cannot read this U-Net
        load_model(stem)
    cfg["head"].update(feature_channels=16, temb_dim=64)
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="does not match the architecture.*shape mismatch"):
        load_model(stem)
    cfg["unet"]["bogus"] = 1
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="bad config"):
        load_model(stem)
    cfg["format"] = "other"
    (tmp_path / "m.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="expected format"):
        load_model(stem)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "absent")


def test_bundled_default_loads():
    if not default_model_path().with_suffix(".safetensors").exists():
        pytest.skip("bundled default model not present in genie_fast/assets")
    m = load_default()
    x = torch.randn(2, 1, 32, 32)
    eps, deps = m.eps_and_deps(x, torch.tensor([0.5, 1.0]))
    assert eps.shape == deps.shape == x.shape and torch.isfinite(deps).all()
