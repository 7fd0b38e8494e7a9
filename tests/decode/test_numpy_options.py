"""Sampling options given as numpy scalars (from a config, a sweep) are numbers like any other."""

from __future__ import annotations

import numpy as np
import pytest

from twotower.decode.spec import DecodeSpec


@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.int64(1)])
def test_numpy_scalars_are_accepted(value):
    DecodeSpec(temperature=value, confidence_threshold=value if value <= 1 else 0.9).validate()


@pytest.mark.parametrize("value", [np.float32("nan"), np.float32(-1), True])
def test_bad_values_are_still_refused(value):
    with pytest.raises(ValueError, match="temperature must be 0"):
        DecodeSpec(temperature=value).validate()
