import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """The test models are tiny: a second thread gains nothing, and OpenMP's spinning threads cost seconds (up to
    10x) on a busy 2-core machine. Subprocesses started by tests keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
