"""Unit-test settings shared by every test module."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """CI boxes share 2 cores: intra-op threads only add contention (10-100x slower) here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
