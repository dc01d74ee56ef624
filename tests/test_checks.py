"""The shared argument predicates."""

import math

import numpy as np
import pytest

from gemma_lab import checks


@pytest.mark.parametrize(
    "value, integer, real, positive",
    [
        (3, True, True, True),
        (np.int8(-2), True, True, False),
        (0, True, True, False),
        (2.5, False, True, True),
        (np.float32(1e-3), False, True, True),
        (True, False, False, False),
        (np.bool_(True), False, False, False),
        (math.nan, False, True, False),
        (math.inf, False, True, False),
        ("1", False, False, False),
        (None, False, False, False),
    ],
)
def test_predicates_accept_numbers_and_refuse_bools(
    value, integer, real, positive
):
    assert checks.is_int(value) is integer
    assert checks.is_real(value) is real
    assert checks.is_positive_real(value) is positive
