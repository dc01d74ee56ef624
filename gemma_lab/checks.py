"""The tests that argument checks share.

Public functions of gemma_lab check their arguments before any work and
name the bad one in the error they raise; these predicates are what they
test. A bool is never a number here: `True` as a rank or a count is a
mistake, although Python counts it as an int.
"""

from __future__ import annotations

import math
import numbers


def is_int(value) -> bool:
    """An integer, Python's or NumPy's, that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (an int or a float, NumPy's included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_positive_real(value) -> bool:
    """A finite real number greater than 0 (see `is_real`)."""
    return is_real(value) and math.isfinite(value) and bool(value > 0)
