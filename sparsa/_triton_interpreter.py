"""Work-around for Triton 3.6's CPU interpreter (`TRITON_INTERPRET=1`) with NumPy >= 2.3, applied on
import by the modules whose kernels have run-time loop bounds (tests only; no effect on GPU runs).

The interpreter turns a scalar kernel value used as a `range` bound into a Python int with
`int(array)`, but it stores scalars as 1-element 1-D arrays, which NumPy 2.3+ refuses to convert
("only 0-dimensional arrays can be converted to Python scalars"). `interpreter_index_fix()` makes
`__index__` take the single element instead.
"""
from __future__ import annotations

import os


def _index(self):
    data = self.handle.data
    return int(data.reshape(-1)[0]) if data.size == 1 else int(data)


def interpreter_index_fix() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001  # pragma: no cover - triton missing or reorganised
        return
    if getattr(interpreter, "_sparsa_index_patched", False) or not hasattr(interpreter, "_patch_lang_tensor"):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    interpreter._patch_lang_tensor = patched
    interpreter._sparsa_index_patched = True


interpreter_index_fix()
