"""Triton kernels of lwz (fused log-probs, GRPO loss) and their plain-torch references."""

import os


def _fix_interpreter_scalar_index():
    """Triton 3.6's interpreter turns a scalar tensor (a 1-element numpy array) into an int with
    int(array), which NumPy >= 2.4 rejects ("only 0-dimensional arrays can be converted to Python
    scalars"), so every kernel loop over a runtime bound fails under TRITON_INTERPRET=1. Later
    Triton squeezes the array first; do the same here. No-op where NumPy still converts."""
    try:
        import numpy as np

        int(np.zeros(1))
        return
    except TypeError:
        pass
    except ImportError:
        return
    try:
        from triton.runtime import interpreter
    except Exception:  # no triton: the torch paths do not need it
        return
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "lwz_squeeze", False) or not hasattr(interpreter, "_LangPatchScope"):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.lwz_squeeze = True
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _fix_interpreter_scalar_index()
