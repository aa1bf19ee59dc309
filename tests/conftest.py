"""Fixtures shared by the whole suite."""
import pytest
import torch


@pytest.fixture
def one_thread():
    """Single-threaded torch: tiny models are many times slower under thread contention on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fresh_accelerate():
    """Reset accelerate's process-wide state after a test that built an Accelerator in this process."""
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
