"""Progress of the build's long loops: a bar on a terminal, one line when done elsewhere.

tqdm draws its bar again at each update, and once more when it closes (at the overall
rate), each time after a carriage return. A terminal overwrites the line, so the bar stays
one line there. A log file, a pipe or a CI console keeps every drawing: a bar whose steps
each take longer than tqdm's refresh interval (verify's sensitivity, at a second or more a
layer) showed its 100% line twice, from the last update and from the close, on top of
every line before. Off a terminal, a loop here is one line when it ends: what, how many,
how long.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(desc: str, unit: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """Yields `update(n)`, to call as `n` more units are done."""
    if sys.stderr.isatty():
        with tqdm(total=total, desc=desc, unit=unit) as bar:
            yield bar.update
        return
    done, started = 0, time.perf_counter()

    def update(n: int = 1) -> None:
        nonlocal done
        done += n

    yield update
    print(f"{desc}: {done} {unit}{'' if done == 1 else 's'}, {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)
