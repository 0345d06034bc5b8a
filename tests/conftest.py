import os

import lightning as L
import pytest

# Keep the generated MNIST-1D cache out of the user's home during tests, shared by the whole session.
os.environ.setdefault("LIGHTNING_KD_DATA", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "mnist1d"))


@pytest.fixture(autouse=True)
def _seed():
    L.seed_everything(1234, verbose=False)
