import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in float64: gradient checks need the precision."""
    with jax.enable_x64(True):
        yield


def pytest_collection_modifyitems(config, items):
    """Skip tests marked slow when CI=true: CI has 2 cores and a time budget."""
    import os

    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason="slow test: skipped when CI=true (run it locally)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
