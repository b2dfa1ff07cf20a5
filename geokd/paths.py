"""Where the real data lives (issue #10): the one lookup used by the tests, the examples and the
benchmarks.

`shared_data_dir()` is, in order:

1. `$GEOKD_DATA`, when set and not empty (`~` expanded; a relative path is taken from the current
   directory). It wins over everything else. A `GEOKD_DATA` that names no folder is an error (a
   one-line `GeokdError` naming the variable and the path), never a silent fall-back: a typo must
   not quietly run on other data or skip every data test.
2. `../shared/data` next to the project checkout (the folder that holds `pyproject.toml` and this
   package), when it exists. An installed (non-checkout) geokd has no such folder.
3. None: no real data here. Tests skip, with a reason naming both places; examples and benchmarks
   ask for their data option (`require_shared_data`).
"""

from __future__ import annotations

import os
from pathlib import Path

from geokd.errors import GeokdError

DATA_ENV = "GEOKD_DATA"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# The checkout's sibling data folder; None for an installed package (no pyproject.toml above it).
CHECKOUT_DATA: Path | None = (
    _PACKAGE_ROOT.parent / "shared" / "data" if (_PACKAGE_ROOT / "pyproject.toml").is_file() else None
)


def shared_data_dir() -> Path | None:
    """The real-data folder: `$GEOKD_DATA`, else the checkout's `../shared/data`, else None.

    Raises a GeokdError when `GEOKD_DATA` is set to something that is not a folder."""
    given = os.environ.get(DATA_ENV, "").strip()
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_dir():
            what = "is not a folder" if path.exists() else "does not exist"
            raise GeokdError(
                f"{DATA_ENV}={given!r}: {path} {what}; point {DATA_ENV} at the data folder (the one holding "
                f"glue/ and instruct/) or unset it"
            )
        return path
    if CHECKOUT_DATA is not None and CHECKOUT_DATA.is_dir():
        return CHECKOUT_DATA
    return None


def where_to_put_data() -> str:
    """The places `shared_data_dir` looks, in words (for skip reasons and error messages)."""
    checkout = (
        f"at {CHECKOUT_DATA}" if CHECKOUT_DATA is not None else "next to a geokd checkout (../shared/data)"
    )
    return f"set {DATA_ENV} to the data folder, or put it {checkout}"


def require_shared_data(*parts: str, option: str) -> Path:
    """`shared_data_dir() / parts`, which must exist; otherwise a one-line GeokdError that names
    `option` (the command-line way to give the path instead) and both places searched."""
    root = shared_data_dir()
    if root is None:
        raise GeokdError(f"no real data found: pass {option}, or {where_to_put_data()}")
    path = root.joinpath(*parts)
    if not path.exists():
        origin = f"{DATA_ENV}" if os.environ.get(DATA_ENV, "").strip() else "the checkout's data folder"
        raise GeokdError(f"{path} does not exist (under {root}, from {origin}); pass {option}")
    return path
