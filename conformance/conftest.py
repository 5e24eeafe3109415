import pytest

from conformance.backends import Backend, current


@pytest.fixture(scope="session")
def backend() -> Backend:
    return current()
