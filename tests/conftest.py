"""Shared pytest setup.

Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET
must be set before any @triton.jit function is defined, i.e. before genie_fast.kernels is
imported, so it is set here, before any test module is collected. Tests marked `cuda` skip
cleanly without a GPU.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors (extra threads only contend with whatever else
    runs on the machine); use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def data_root(tmp_path):
    """A tiny Fashion-MNIST folder (16 random train images and labels) for the training commands."""
    import numpy as np

    from _helpers import write_idx

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (16, 28, 28)))
    write_idx(root / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, (16,)))
    return root
