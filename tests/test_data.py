
import numpy as np
import pytest
import torch

from genie_fast.data import DataMissingError, infinite_batches, load_fashion_mnist, read_idx, to_model_range


from _helpers import write_idx as _write_idx


@pytest.fixture
def fake_root(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return tmp_path


def test_read_idx_offsets(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", arr)
    _write_idx(tmp_path / "b", arr[0, 0], gz=False)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    assert np.array_equal(read_idx(tmp_path / "b"), arr[0, 0])
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_load_pads_and_scales(fake_root):
    x, y = load_fashion_mnist("train", root=fake_root)
    assert x.shape == (20, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (20,) and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    # 2-pixel background border, image in the middle
    assert torch.all(x[..., :2, :] == -1) and torch.all(x[..., :, -2:] == -1)
    raw = read_idx(fake_root / "train-images-idx3-ubyte.gz")
    assert torch.allclose(x[:, 0, 2:30, 2:30], torch.from_numpy(raw).float() / 127.5 - 1)
    xt, _ = load_fashion_mnist("test", root=fake_root)
    assert xt.shape[0] == 10


def test_missing_data_message(tmp_path):
    with pytest.raises(DataMissingError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("valid", root=tmp_path)


def test_to_model_range_extremes():
    x = to_model_range(np.array([[[0, 255]]], dtype=np.uint8), pad_to=4)
    assert x.shape == (1, 1, 4, 4)
    assert x[0, 0, 1, 1] == -1 and x[0, 0, 1, 2] == 1


def test_infinite_batches_cover_epoch():
    data = torch.arange(10.0).reshape(10, 1, 1, 1)
    it = infinite_batches(data, 5, torch.Generator().manual_seed(0), hflip=False)
    seen = torch.cat([next(it), next(it)]).flatten().sort().values
    assert torch.equal(seen, torch.arange(10.0))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        next(infinite_batches(data, 11, torch.Generator()))
