"""Tests for stablenet.smoothing.arguments (one-line errors that name what is allowed) and its deprecated alias."""

from __future__ import annotations

import importlib
import math
import sys

import pytest

from stablenet.smoothing import arguments


@pytest.mark.parametrize(
    ("check", "value", "match"),
    [
        (lambda v: arguments.check_positive("sigma", v), 0.0, "sigma must be a finite number > 0; got 0.0"),
        (lambda v: arguments.check_positive("sigma", v), math.inf, "sigma must be a finite number > 0; got inf"),
        (lambda v: arguments.check_positive("sigma", v), True, "sigma must be a finite number > 0; got True"),
        (arguments.check_lipschitz, math.nan, r"lipschitz must be a number > 0 \(or inf\); got nan"),
        (arguments.check_lipschitz, -1, r"lipschitz must be a number > 0 \(or inf\); got -1"),
        (lambda v: arguments.check_count("n", v), 0, "n must be an int >= 1; got 0"),
        (arguments.check_alpha, 1.0, r"alpha must be a number in the open interval \(0, 1\); got 1.0"),
    ],
)
def test_checks_give_one_line_errors(check, value, match):
    with pytest.raises(ValueError, match=match) as info:
        check(value)
    assert "\n" not in str(info.value)


def test_checks_return_the_value_as_a_float():
    assert arguments.check_positive("sigma", 1) == 1.0 and isinstance(arguments.check_positive("sigma", 1), float)
    assert arguments.check_lipschitz(math.inf) == math.inf


def test_old_module_path_is_a_deprecated_alias():
    sys.modules.pop("stablenet.smoothing.base", None)
    with pytest.warns(DeprecationWarning, match="import from stablenet.smoothing.arguments"):
        base = importlib.import_module("stablenet.smoothing.base")
    assert base.__all__ == arguments.__all__
    assert all(getattr(base, name) is getattr(arguments, name) for name in arguments.__all__)
