"""What every kernel module shares: Triton kernels jitted on first use, and block-size rounding."""

from __future__ import annotations

import os
from collections.abc import Callable


class LazyKernels:
    """Triton kernels by name, jitted on first use, once per interpreter mode.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a function, so jitting at import would fix
    the mode before tests (or users) choose it; this keeps one jitted kernel per mode instead.

    Parameters
    ----------
    functions : dict
        Kernel name -> the plain Python function written in Triton's language.
    """

    def __init__(self, functions: dict[str, Callable]):
        self.functions = functions
        self._jitted: dict[tuple[str, bool], object] = {}

    def __call__(self, name: str):
        import triton

        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
        key = (name, interpret)
        if key not in self._jitted:
            self._jitted[key] = triton.jit(self.functions[name])
        return self._jitted[key]


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block sizes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())
