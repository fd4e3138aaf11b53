import jax
import pytest


@pytest.fixture
def x64():
    """Run a test in float64: gradient checks need the precision."""
    with jax.enable_x64(True):
        yield
