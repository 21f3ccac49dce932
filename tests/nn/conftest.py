"""Every layer test works on tiny float64 problems: one intra-op thread for all of them."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Takes the ``one_thread`` fixture of ``tests/conftest.py`` for every module in ``tests/nn``."""
    yield
