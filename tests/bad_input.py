"""The shared bad-input check: every op's file lists its cases, this runs them.

A case is (call, error type, *fragments). The call must raise exactly that error type, with a
message that names the op (e.g. "mmot.sinkhorn"), the argument (a quoted fragment such as
"'scores'") and, in the other fragments, what was expected.
"""

from __future__ import annotations

import pytest


def bad_input_test(op: str, cases: list[tuple]):
    """A test function parametrised over ``cases`` of the public function ``op``."""
    for _, _, *fragments in cases:
        assert any(f.startswith("'") or " '" in f for f in fragments), f"case {fragments} names no argument"
    params = [
        pytest.param(call, error, (op, *fragments), id=f"{index}-{fragments[0]}") for index, (call, error, *fragments) in enumerate(cases)
    ]

    @pytest.mark.parametrize("call, error, fragments", params)
    def test_bad_input_is_named(call, error, fragments):
        with pytest.raises(error) as info:
            call()
        assert type(info.value) is error, f"raised {type(info.value).__name__}, expected {error.__name__}: {info.value}"
        for fragment in fragments:
            assert fragment in str(info.value), f"{fragment!r} missing from: {info.value}"

    return test_bad_input_is_named
