"""Fixtures shared by the plugin tests."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices do not split well over threads: one thread is faster on a busy 2-core machine
    (two threads ran the FLUX.2 training module 4× slower). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def check_lora_moves_and_reference_is_the_base(bb, plain, x, sigma, cond) -> None:
    """With the LoRA B matrices moved off zero the velocity changes, and ``reference()`` (the adapters
    switched off) gives the base backbone ``plain``'s velocity back."""
    base = plain.velocity(x, sigma, cond)
    for name, p in bb.module.named_parameters():
        if "lora_B" in name:
            p.add_(0.1)
    assert float((bb.velocity(x, sigma, cond) - base).abs().max()) > 1e-3
    with bb.reference():
        torch.testing.assert_close(bb.velocity(x, sigma, cond), base, atol=1e-6, rtol=0)
