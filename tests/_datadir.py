"""The real data for the tests that use it (issue #10): found by `geokd.paths.shared_data_dir`
($GEOKD_DATA, else ../shared/data next to the checkout). A test that needs it calls
`shared_data(...)`, which skips the test, with a reason naming both places, when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from geokd.errors import GeokdError
from geokd.paths import shared_data_dir, where_to_put_data


def shared_data(*parts: str) -> Path:
    """`<data folder>/<parts>`; skips the calling test when the folder or that path is missing, and
    when GEOKD_DATA names no folder (the error's text is the reason)."""
    try:
        root = shared_data_dir()
    except GeokdError as exc:
        pytest.skip(f"the real data is unavailable: {exc}")
    if root is None:
        pytest.skip(f"needs the real data: {where_to_put_data()}")
    path = root.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}, which the data folder {root} lacks")
    return path
