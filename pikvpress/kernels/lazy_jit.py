"""What every kernel module shares: Triton kernels jitted on first use, and block-size rounding."""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Sequence


class LazyKernels:
    """Triton kernels by name, jitted on first use, once per interpreter mode.

    ``triton.jit`` reads ``TRITON_INTERPRET`` when it wraps a function, so jitting at import would fix
    the mode before tests (or users) choose it; this keeps one jitted kernel per mode instead.

    Parameters
    ----------
    functions : dict
        Kernel name -> the plain Python function written in Triton's language.
    helpers : sequence of callables, optional
        The plain functions the kernels call (Triton device functions), defined in the kernels' module.
        A kernel must call helpers jitted in its own mode, so each mode gets a copy of that module's
        namespace in which every helper's name is bound to the helper jitted in that mode, and the
        kernels (and helpers) of that mode are jitted over that copy.
    """

    def __init__(self, functions: dict[str, Callable], helpers: Sequence[Callable] = ()):
        self.functions = functions
        self.helpers = tuple(helpers)
        namespaces = {id(fn.__globals__) for fn in (*functions.values(), *self.helpers)}
        if self.helpers and len(namespaces) != 1:
            raise ValueError("LazyKernels: kernels and their helpers must be defined in one module")
        self._jitted: dict[tuple[str, bool], object] = {}
        self._scopes: dict[bool, dict] = {}

    def __call__(self, name: str):
        import triton

        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
        key = (name, interpret)
        if key not in self._jitted:
            fn = self.functions[name]
            if self.helpers:
                fn = _rebind(fn, self._scope(interpret))
            self._jitted[key] = triton.jit(fn)
        return self._jitted[key]

    def _scope(self, interpret: bool) -> dict:
        """The kernels' module namespace with every helper bound to itself jitted in this mode."""
        if interpret not in self._scopes:
            import triton

            scope = dict(self.helpers[0].__globals__)
            for helper in self.helpers:
                scope[helper.__name__] = triton.jit(_rebind(helper, scope))
            self._scopes[interpret] = scope
        return self._scopes[interpret]


def _rebind(fn: Callable, scope: dict) -> Callable:
    """``fn`` (same code, source and signature) resolving its global names in ``scope``."""
    new = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__annotations__ = fn.__annotations__
    new.__doc__ = fn.__doc__
    new.__module__ = fn.__module__
    new.__qualname__ = fn.__qualname__
    return new


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton block sizes must be powers of two."""
    return 1 << max(0, (n - 1).bit_length())
