"""The GPU tier (issue #14): skipped as a whole without CUDA. It reuses the integration tier's
toy data and tiny models (loaded from tests/integration/conftest.py under another module name)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

_INTEGRATION = Path(__file__).resolve().parents[1] / "integration"
sys.path.insert(0, str(_INTEGRATION))  # toyglue
_spec = importlib.util.spec_from_file_location("geokd_integration_fixtures", _INTEGRATION / "conftest.py")
_fixtures = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(_fixtures)  # type: ignore[union-attr]
glue_dir, base_dir, teacher_dir = _fixtures.glue_dir, _fixtures.base_dir, _fixtures.teacher_dir


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device on this machine (the gpu tier needs one)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)
