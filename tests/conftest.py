import os

import pytest
import torch

# Tests run on two CPU cores; keep torch from oversubscribing them. Under pytest-xdist (`make test` runs
# a worker a core) each worker, and each kernel or process it starts, computes on one thread.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))

# Image folders found readable are remembered (data_utils.images); the tests' folders are remembered in a
# folder of this session's (removed when it ends; xdist workers inherit it), not in the user's ~/.cache.
if not os.environ.get("MUX_VERIFIED_CACHE"):
    import tempfile

    _verified_cache = tempfile.TemporaryDirectory(prefix="mux-verified-")
    os.environ["MUX_VERIFIED_CACHE"] = _verified_cache.name


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures(...)``): on two
    shared cores, two threads wait for each other at every operation (milliseconds each), far longer than
    the operation itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_digits():
    """A small, fixed slice of the digits splits, for fast training tests."""
    from torch.utils.data import Subset

    from data_utils import load_digits_splits

    s = load_digits_splits(seed=0)
    return Subset(s.train, range(120)), Subset(s.test, range(37))

# No per-example deadlines: timings on a busy 2-core machine are not what these tests check. Derandomised:
# every run draws the same examples, so a clean-clone run fails or passes as the last one did.
from hypothesis import settings

settings.register_profile("course", deadline=None, derandomize=True)
settings.load_profile("course")
