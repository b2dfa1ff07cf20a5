"""geokd: geometry-aware knowledge distillation for transformer language models.

Nothing happens at import time beyond defining names; heavy modules (torch, transformers) are
imported by the submodules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"

from geokd.errors import GeokdError  # noqa: E402

__all__ = ["GeokdError", "__version__"]
