"""Whichever TFLite interpreter this machine has: LiteRT (ai-edge-litert) or tflite-runtime.

Both expose the same `Interpreter` and `load_delegate`; LiteRT is the successor
and works with numpy 2, tflite-runtime 2.14 needs numpy < 2 (common on older Pis).

The interpreter runs on as many threads as `use_threads` says, by default every core the
process may use (left alone, LiteRT takes one): a process-wide setting, as BLAS's thread
count is, which the command line's `--threads` sets once.

TFLite's C++ side writes its INFO lines straight to the process's stderr
(`INFO: Created TensorFlow Lite XNNPACK delegate for CPU.`, once per interpreter) and no
environment variable silences them; `quiet_info` holds them back while an interpreter is
made and passes every other line (warnings, errors) through.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
import threading

from .packages import missing

try:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType, load_delegate
    INTERPRETER = "ai-edge-litert"
except ImportError:  # pragma: no cover - depends on what the machine has
    try:
        from tflite_runtime.interpreter import Interpreter, OpResolverType, load_delegate
        INTERPRETER = "tflite-runtime"
    except ImportError:
        Interpreter = load_delegate = OpResolverType = None
        INTERPRETER = None


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


_threads = available_cores()


def use_threads(n: int) -> None:
    """Every interpreter made from now on runs on `n` threads."""
    global _threads
    _threads = int(n)


def threads() -> int:
    return _threads


def without_xnnpack() -> dict:
    """Interpreter arguments that keep TFLite's own kernels, without XNNPACK (applied by
    default): the kernels the tests hold XNNPACK's against."""
    return {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}


MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages; reading them again refaults them from the file


def drop_file_pages(path) -> int:
    """Give back the resident pages of `path` mapped into this process (Linux; elsewhere
    nothing): bytes dropped. XNNPACK packs a model's weights into memory of its own while
    the interpreter is made, after which the interpreter's memory-mapped file is not read
    again, yet its pages stay resident: the int8 LM head at 270M counted twice, 168 MB more.
    The mapping stays valid: a page read again comes back from the file. Reading the
    process's mappings takes about 0.6 ms."""
    needle = b" " + os.fsencode(os.path.realpath(path)) + b"\n"
    try:
        with open("/proc/self/maps", "rb") as f:
            maps = f.read()  # one read: a process running a bundle maps hundreds of files
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no /proc (not Linux) or no madvise: the pages stay
        return 0
    ranges, at = [], maps.find(needle)
    while at != -1:  # each line: "start-end perms offset dev inode path"
        line = maps.rfind(b"\n", 0, at) + 1
        ranges.append(maps[line : maps.index(b" ", line)].decode())
        at = maps.find(needle, at + len(needle))
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    dropped = 0
    for r in ranges:
        start, end = (int(v, 16) for v in r.split("-"))
        if madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


INTERPRETER_PURPOSE = ("the cpu and edgetpu backends run TFLite with it; where it has no wheel, "
                       "tflite-runtime with numpy<2 does too")


def require_interpreter():
    """The Interpreter class, or MissingPackageError saying how to install one."""
    if Interpreter is None:
        raise missing("ai_edge_litert", INTERPRETER_PURPOSE)
    return Interpreter


# File descriptor 2 belongs to the process: threads that open interpreters at once (the
# server's engines warm up together) take turns, or one would save another's temporary file
# as "stderr" and put it back for good, and the process's log would go to a deleted file.
_REDIRECTING = threading.RLock()


@contextlib.contextmanager
def quiet_info():
    """Inside: what is written to file descriptor 2 is kept, then written back to stderr
    without the lines that start with `INFO: `."""
    with _REDIRECTING:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no stderr to filter
            yield
            return
        with tempfile.TemporaryFile() as kept:
            os.dup2(kept.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                kept.seek(0)
                lines = kept.read().decode(errors="replace").splitlines(keepends=True)
                shown = "".join(line for line in lines if not line.startswith("INFO: "))
                if shown:
                    sys.stderr.write(shown)
                    sys.stderr.flush()
