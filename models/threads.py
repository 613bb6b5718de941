"""How many threads torch's intra-op work may use, for the duration of a block.

Small tensors (a slice, a probe's pixels, a batch of two 80² slices) gain little from a second
thread on a 2-core machine and lose a lot when the other core is busy: the threads spin-wait.
Measured while another job trained on the same 2 cores: propagating the demo's 73×47×73 spine CT
took 20.8 s on 2 threads and 0.9 s on one (TotalSegmentator's 122×101×112 CT 7.2 s vs 3.3 s); 30
steps of a scratch network on 3 of its slices (batch 2) 30.4 s vs 5.7 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``, then restore the previous setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
