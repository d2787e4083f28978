"""Datasets (VOC, COCO, list files, the built-in synthetic set) and loaders (DALI, nvJPEG, torchvision).

Names are imported on first use, so that ``import c2f_fast.data`` does not load DALI.
"""

import importlib

_EXPORTS = {
    "MultiLabelSet": "records",
    "Box": "records",
    "load_voc": "voc",
    "VOC_CLASSES": "voc",
    "load_coco": "coco",
    "load_list": "listfile",
    "make_synthetic": "synthetic",
    "build_loader": "loaders",
    "BadImageError": "images",
    "BadImageReport": "images",
    "check_image": "images",
    "scan_images": "images",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'c2f_fast.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
