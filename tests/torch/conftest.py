"""flora_torch tests run torch single-threaded.

The tensors here are tiny; with several OpenMP threads on a busy 2-core machine every
op waits at a barrier for a descheduled thread (milliseconds per matmul). Results
do not depend on it; the resume test passes the thread count to its subprocess.
"""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
