"""Model tests run tiny models whose ops are too small to gain from a second thread; one thread keeps
them fast and steady when the two CI cores are shared. Scoped to this folder's tests (restored after)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
