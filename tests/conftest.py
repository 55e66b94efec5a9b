"""Shared test fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (and its module-scoped fixtures).

    The tests run tiny float64 models on a shared 2-core CPU, where one thread is faster
    than two oversubscribed ones. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
