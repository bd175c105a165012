"""Keep Triton's CPU interpreter usable with NumPy >= 2.4 (tests only; no effect on GPU runs).

The interpreter holds every scalar as a one-element 1-d NumPy array and converts it with ``int(array)``
when a runtime integer bounds a ``range`` loop. NumPy 2.4 turned that conversion of a 1-d array into a
``TypeError`` ("only 0-dimensional arrays can be converted to Python scalars"), so any kernel whose loop
count is a runtime argument (ours: the critical-block count, CSR offsets) fails under
``TRITON_INTERPRET=1``. This re-installs the ``__index__`` hook with a conversion that accepts one-element
arrays. It is applied only when the interpreter is on.
"""

from __future__ import annotations

import functools


def patch_interpreter_index() -> None:
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sla_patched", False):
        return

    @functools.wraps(original)
    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sla_patched = True
    interpreter._patch_lang_tensor = patched
