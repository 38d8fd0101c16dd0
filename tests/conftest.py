import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are thousands of small ops: one intra-op thread is faster and immune to other processes on the
    machine (the serving engines run the same way, cpu_threads=1). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fail_nth_decode(engine, monkeypatch, n: int, message: str) -> None:
    """Make the engine's n-th decode step raise RuntimeError(message): a fault injected into a running engine."""
    real, calls = engine._decode, {"n": 0}

    def flaky(seqs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real(seqs)

    monkeypatch.setattr(engine, "_decode", flaky)
