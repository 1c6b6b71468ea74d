"""Progress of the build's long loops: a bar on a terminal, plain lines elsewhere.

tqdm draws its bar again at each update, and once more when it closes (at the overall
rate), each time after a carriage return. A terminal overwrites the line, so the bar stays
one line there. A log file, a pipe or a CI console keeps every drawing: a bar whose steps
each take longer than tqdm's refresh interval (verify's sensitivity, at a second or more a
layer) showed its 100% line twice, from the last update and from the close, on top of
every line before. Off a terminal, a loop here says how far it is every `EVERY` seconds
(Gemma's verify was silent for four minutes, which reads as a hang), and one line when it
ends: what, how many, how long.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm

EVERY = 30.0  # seconds between progress lines off a terminal


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


@contextlib.contextmanager
def progress_bar(desc: str, unit: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `update(n)`, to call as `n` more units are done."""
    if sys.stderr.isatty():
        with tqdm(total=total, desc=desc, unit=unit) as bar:
            yield bar.update
        return
    done, started = 0, time.perf_counter()
    said = started

    def update(n: int = 1) -> None:
        nonlocal done, said
        done += n
        now = time.perf_counter()
        if now - said >= EVERY:
            of = f"{done} of {_count(total, unit)}" if total is not None else _count(done, unit)
            print(f"{desc}: {of} so far, {now - started:.0f} s", file=sys.stderr, flush=True)
            said = now

    yield update
    print(f"{desc}: {_count(done, unit)}, {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
