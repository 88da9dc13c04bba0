"""Helpers shared by test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import numpy as np


def central_difference(f_np, args, i: int, h: float = 1e-6) -> np.ndarray:
    """Central differences of the float64 formula f_np(*args) (a scalar) with respect to args[i]."""
    a64 = [np.asarray(x, np.float64) for x in args]
    num = np.zeros_like(a64[i])
    for idx in np.ndindex(a64[i].shape):
        plus, minus = list(a64), list(a64)
        plus[i], minus[i] = a64[i].copy(), a64[i].copy()
        plus[i][idx] += h
        minus[i][idx] -= h
        num[idx] = (f_np(*plus) - f_np(*minus)) / (2 * h)
    return num
