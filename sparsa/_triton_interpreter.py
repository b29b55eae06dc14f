"""A compatibility patch for Triton's CPU interpreter (`TRITON_INTERPRET=1`), applied on import."""
from __future__ import annotations

import os


def interpreter_index_fix() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and `range(tensor)` calls
    int(array), which NumPy >= 2.4 rejects for 1-d arrays. Make `__index__` take the element."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from triton.runtime import interpreter
    except Exception:  # noqa: BLE001  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_sparsa_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sparsa_fixed = True
    interpreter._patch_lang_tensor = patched


interpreter_index_fix()
