"""Class conditioning of the U-Net and the fine-tuning entry points that build on it."""
import os
import pickle

import pytest
import torch

from _helpers import randomize
from genie_fast.models.head import GenieHead, GenieModel, HeadConfig
from genie_fast.models.unet import UNet, UNetConfig
from genie_fast.schedule import VPSchedule, q_sample
from genie_fast.train import (check_run_dir, diffusion_loss, drop_labels, init_from_model, load_checkpoint,
                              null_teacher_loss, save_checkpoint)

TINY_COND = UNetConfig(in_channels=1, image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), num_classes=3)


def _x_t(b=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 8, 8, generator=g), 0.05 + 0.9 * torch.rand(b, generator=g)


def test_labels_change_eps_once_embedding_is_trained():
    torch.manual_seed(0)
    u = UNet(TINY_COND)
    randomize(u, 0.2)
    x, t = _x_t()
    with torch.no_grad():
        u.label_emb.weight.zero_()
        # a zero embedding (its initial value): every label, and None (null), gives the same eps
        base = u(x, t)
        assert base.abs().max() > 0
        assert torch.equal(base, u(x, t, labels=torch.tensor([0, 1, 2, 3])))
        u.label_emb.weight.normal_()
        e0, e1 = u(x, t, labels=torch.zeros(4, dtype=torch.long)), u(x, t, labels=torch.ones(4, dtype=torch.long))
        null = u(x, t, labels=torch.full((4,), 3))
        assert not torch.allclose(e0, e1)
        assert torch.equal(null, u(x, t))  # None means the null class (index num_classes)


def test_null_teacher_loss_replaces_the_noise_target_of_null_labels_only():
    torch.manual_seed(0)
    u, teacher = UNet(TINY_COND), UNet(UNetConfig(**{**TINY_COND.to_dict(), "num_classes": 0}))
    randomize(u, 0.2)
    randomize(teacher, 0.2)
    x0, sched, k = torch.randn(6, 1, 8, 8), VPSchedule(), TINY_COND.num_classes
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731 (the same t and noise for every loss)
    labelled = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        loss, part = null_teacher_loss(u, teacher, x0, labelled, k, sched, gen())
        assert torch.equal(loss, diffusion_loss(u, x0, sched, gen(), labelled)) and part == 0  # no null label
        # all null, the teacher being the student's own null branch: nothing left to learn
        loss, part = null_teacher_loss(u, lambda x, t: u(x, t), x0, torch.full((6,), k), k, sched, gen())
        assert loss == 0 and part == 0
        # mixed: the null share is the teacher-matching error of the null samples over the whole batch
        mixed = torch.tensor([0, k, 2, k, 1, k])
        loss, part = null_teacher_loss(u, teacher, x0, mixed, k, sched, gen())
        x_t, t, z = q_sample(x0, sched, gen())
        err = (u(x_t, t, labels=mixed) - torch.where((mixed == k)[:, None, None, None], teacher(x_t, t), z)).pow(2)
        torch.testing.assert_close(loss, err.mean())
        torch.testing.assert_close(part, err[mixed == k].sum() / err.numel())
        assert 0 < part < loss


def test_labels_reach_the_head_through_temb():
    torch.manual_seed(0)
    u = UNet(TINY_COND)
    head = GenieHead(HeadConfig.for_unet(u))
    randomize(u, 0.2)
    randomize(head, 0.2, seed=1)
    m = GenieModel(u, head)
    x, t = _x_t()
    with torch.no_grad():
        _, h0 = m.eps_and_head(x, t, labels=torch.zeros(4, dtype=torch.long))
        _, h1 = m.eps_and_head(x, t, labels=torch.ones(4, dtype=torch.long))
    assert not torch.allclose(h0, h1)


def test_unconditional_unet_refuses_labels():
    u = UNet("tiny")
    x, t = _x_t()
    with pytest.raises(ValueError, match="unconditional"):
        u(x, t, labels=torch.zeros(4, dtype=torch.long))


def test_bad_num_classes_refused():
    with pytest.raises(ValueError, match="num_classes"):
        UNetConfig(num_classes=-1)


def test_drop_labels_rate_and_null_index():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (20000,), generator=g)
    d = drop_labels(y, 10, 0.15, g)
    dropped = d == 10
    assert abs(dropped.float().mean().item() - 0.15) < 0.01
    assert torch.equal(d[~dropped], y[~dropped])
    assert torch.equal(drop_labels(y, 10, 0.0, g), y)


def test_init_from_model_keeps_function_and_refuses_other_shapes(tmp_path):
    from genie_fast.models.default import save_model

    torch.manual_seed(0)
    src_cfg = UNetConfig(**{**TINY_COND.to_dict(), "num_classes": 0})
    src = GenieModel(UNet(src_cfg))
    randomize(src, 0.2)
    stem = save_model(src, tmp_path / "m")
    cond = UNet(TINY_COND)
    init_from_model(cond, stem)
    x, t = _x_t()
    with torch.no_grad():
        assert torch.equal(src.unet(x, t), cond(x, t, labels=torch.tensor([0, 1, 2, 0])))
    other = UNet(UNetConfig(**{**TINY_COND.to_dict(), "nf": 16}))
    with pytest.raises(ValueError, match="does not match"):
        init_from_model(other, stem)


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", {"step": 3})
    with pytest.raises(ValueError, match="--resume"):
        check_run_dir(tmp_path, resume=False, overwrite=False)
    check_run_dir(tmp_path, resume=True, overwrite=False)
    check_run_dir(tmp_path, resume=False, overwrite=True)


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_with_code_is_refused(tmp_path):
    p = tmp_path / "ckpt.pt"
    torch.save({"step": 1, "evil": _Payload()}, p, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(p)


def test_truncated_checkpoint_names_the_file(tmp_path):
    p = tmp_path / "ckpt.pt"
    save_checkpoint(p, {"step": 1, "w": torch.zeros(1000)})
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(p)):
        load_checkpoint(p)


def test_conditional_finetune_distill_export_end_to_end(tmp_path):
    """An unconditional export -> conditional fine-tune (--init-model) -> head distillation from the
    exported head (--init-head) with labels -> export -> a model whose labels change eps and head."""
    import numpy as np

    from _helpers import write_idx
    from genie_fast.cli import main
    from genie_fast.models.default import load_model

    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (16, 28, 28)))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (16,)))
    common = ["--data-root", str(tmp_path), "--batch", "4", "--threads", "1", "--log-every", "1"]
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "u"), "--steps", "1", *common]) == 0
    assert main(["distill", "--unet-ckpt", str(tmp_path / "u" / "ckpt.pt"), "--out", str(tmp_path / "ud"),
                 "--steps", "1", *common]) == 0
    assert main(["export", "--unet-ckpt", str(tmp_path / "u" / "ckpt.pt"), "--head-ckpt",
                 str(tmp_path / "ud" / "ckpt.pt"), "--out", str(tmp_path / "uncond")]) == 0
    assert main(["train", "--config", "tiny_cond", "--init-model", str(tmp_path / "uncond"), "--lr", "1e-2",
                 "--out", str(tmp_path / "c"), "--steps", "3", "--label-dropout", "0.2", *common,
                 "--null-teacher", str(tmp_path / "uncond")]) == 0
    assert "null_part" in (tmp_path / "c" / "log.txt").read_text()
    # the teacher must be unconditional, and only a conditional config has a null class
    assert main(["train", "--config", "tiny_cond", "--null-teacher", str(tmp_path / "c_export_absent"),
                 "--out", str(tmp_path / "c2"), "--steps", "1", *common]) == 2
    assert main(["train", "--config", "tiny", "--null-teacher", str(tmp_path / "uncond"),
                 "--out", str(tmp_path / "u2"), "--steps", "1", *common]) == 2
    assert main(["distill", "--unet-ckpt", str(tmp_path / "c" / "ckpt.pt"), "--init-head", str(tmp_path / "uncond"),
                 "--out", str(tmp_path / "cd"), "--steps", "2", "--lr", "1e-2", *common]) == 0
    assert main(["export", "--unet-ckpt", str(tmp_path / "c" / "ckpt.pt"), "--head-ckpt",
                 str(tmp_path / "cd" / "ckpt.pt"), "--out", str(tmp_path / "cond")]) == 0
    m = load_model(tmp_path / "cond")
    assert m.num_classes == 10
    assert main(["train", "--config", "tiny_cond", "--null-teacher", str(tmp_path / "cond"),
                 "--out", str(tmp_path / "c3"), "--steps", "1", *common]) == 2
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        e0, h0 = m.eps_and_head(x, t, labels=torch.tensor([0, 0]))
        e1, h1 = m.eps_and_head(x, t, labels=torch.tensor([1, 1]))
    assert not torch.equal(e0, e1) and not torch.equal(h0, h1)
    # a fresh run into an existing folder is refused without --resume / --overwrite
    assert main(["train", "--config", "tiny_cond", "--out", str(tmp_path / "c"), "--steps", "1", *common]) == 2


def test_saved_model_files_are_readable_by_everyone_the_umask_allows(tmp_path):
    from genie_fast.models.default import save_model

    stem = save_model(GenieModel(UNet("tiny")), tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    for suffix in (".safetensors", ".json"):
        assert (os.stat(f"{stem}{suffix}").st_mode & 0o777) == 0o666 & ~umask
