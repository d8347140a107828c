"""What the property tests and the fuzz of the CNI plugin share: one way to size a run, one JSON strategy.

Bounded for CI: `default` examples per property, derandomized so a CI run is repeatable. PYFLANNEL_FUZZ_EXAMPLES=N
runs N, randomized, for a longer hunt.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


def examples(default: int) -> int:
    return int(os.environ.get("PYFLANNEL_FUZZ_EXAMPLES") or default)


def fuzz_settings(default: int, *extra: HealthCheck) -> settings:
    n = examples(default)
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=n <= default,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, *extra],
    )


def any_json(
    *, int_bound: int | None, text: int, leaves: int, width: int = 4, infinity: bool = False
) -> st.SearchStrategy[object]:
    """Any JSON value; with `infinity`, also floats that json.dumps writes as the non-JSON `Infinity`."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=None if int_bound is None else -int_bound, max_value=int_bound)
        | st.floats(allow_nan=False, allow_infinity=infinity)
        | st.text(max_size=text)
    )
    return st.recursive(
        scalars,
        lambda kids: st.lists(kids, max_size=width) | st.dictionaries(st.text(max_size=8), kids, max_size=width),
        max_leaves=leaves,
    )
