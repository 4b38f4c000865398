"""Reading single 2D images (masks, darks, flats, calibrant frames): .npy or any fabio format."""
from __future__ import annotations

import os

import numpy as np


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image from .npy (never unpickled) or any format fabio reads; ValueError if not 2D."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
    else:
        import fabio
        arr = np.asarray(fabio.open(path).data)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D image, got shape {arr.shape}")
    return arr
