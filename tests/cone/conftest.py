import pytest
import torch


@pytest.fixture(autouse=True)
def float64():
    """Tests run in float64. (No torch.set_num_threads here: restoring a count of 2 or more leaves
    torch's batched LU broken on MKL builds, pytorch/pytorch#142815.)"""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)
