"""Whichever TFLite interpreter this machine has: LiteRT (ai-edge-litert) or tflite-runtime.

Both expose the same `Interpreter` and `load_delegate`; LiteRT is the successor
and works with numpy 2, tflite-runtime 2.14 needs numpy < 2 (common on older Pis).
"""

from __future__ import annotations

from .packages import missing

try:
    from ai_edge_litert.interpreter import Interpreter, load_delegate
    INTERPRETER = "ai-edge-litert"
except ImportError:  # pragma: no cover - depends on what the machine has
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate
        INTERPRETER = "tflite-runtime"
    except ImportError:
        Interpreter = load_delegate = None
        INTERPRETER = None


INTERPRETER_PURPOSE = ("the cpu and edgetpu backends run TFLite with it; where it has no wheel, "
                       "tflite-runtime with numpy<2 does too")


def require_interpreter():
    """The Interpreter class, or MissingPackageError saying how to install one."""
    if Interpreter is None:
        raise missing("ai_edge_litert", INTERPRETER_PURPOSE)
    return Interpreter
