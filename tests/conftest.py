import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Reference computations in the test thread: one thread is faster for a tiny model and immune to
    other processes on the machine (the serving engines are configured the same way, cpu_threads=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
