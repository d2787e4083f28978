"""Optional packages: imported where they are used, with an error naming the package when missing.

``defusedxml`` reads VOC annotation XML and ``pycocotools`` indexes COCO annotation JSON; nothing
else needs them, so a machine without them trains on the synthetic set or on list files.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingPackageError(ImportError):
    """An optional package that this operation needs is not installed; the message names it."""


def require(module: str, package: str, needed_for: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingPackageError` saying that ``needed_for`` needs
    ``package`` and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingPackageError(
            f"{needed_for} needs the package {package}, which is not importable ({err}): pip install {package}"
        ) from err
