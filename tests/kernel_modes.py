"""How the Pallas kernel tests run: every kernel test is parametrized over MODES, interpret mode on
CPU (always) and the real kernel on a GPU (``gpu`` marker, skipped without one)."""
from __future__ import annotations

import jax
import pytest

HAS_GPU = jax.default_backend() == "gpu"
MODES = [
    pytest.param(True, id="interpret"),
    pytest.param(False, id="gpu", marks=[pytest.mark.gpu,
                                         pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")]),
]
