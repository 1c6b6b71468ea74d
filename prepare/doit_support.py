"""What dodo.py adds to doit's own command line, so that `doit` works on the first try.

- Variables: doit passes any `name=value` to the tasks and ignores the ones nobody reads,
  so `doit bacth=4` built with the recipe's batch and said nothing. `check_variables`
  refuses a name no task reads, naming the closest known one.
- Ctrl-C: doit saves the state of the tasks that finished, then lets KeyboardInterrupt
  through, and Python printed 65-83 lines of traceback. `resume_on_interrupt` prints one
  line saying that running the same command again resumes.
- The lock: one build at a time per artifacts directory (prepare/store.py), but commands
  that only read (`doit list`, `help`, `info`, `dumpdb`) need not wait for a build.
- Time: `TimedReporter` is doit's console reporter plus each task's time as it ends and
  the total at the end.
"""

from __future__ import annotations

import difflib
import shlex
import sys
import time

from doit.reporter import ConsoleReporter

from runner.errors import UserError

STARTED = time.perf_counter()  # dodo.py imports this module first: about when doit started
READ_ONLY_COMMANDS = ("list", "help", "info", "dumpdb", "tabcompletion")
LOADER_OPTIONS_WITH_VALUES = ("-f", "--file", "-d", "--dir")  # doit's options before the command


class VariableError(UserError):
    """A command-line variable no task reads, or one given where another was meant."""


def split_arguments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """doit's own reading of its arguments: `name=value` (not starting with `-`) is a
    variable; the rest, less options, are the command and task names."""
    variables, words, skip = {}, [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LOADER_OPTIONS_WITH_VALUES:
            skip = True
        elif arg.startswith("-"):
            continue
        elif "=" in arg:
            name, value = arg.split("=", 1)
            variables[name] = value
        else:
            words.append(arg)
    return variables, words


def check_variables(variables: dict[str, str], known: dict[str, str]) -> None:
    """Refuse a variable no task reads; `known` maps each name to what reads it."""
    for name, value in variables.items():
        if name == "target" and not value.lstrip().startswith("{"):
            raise VariableError(f"target={value}: `target` is the recipe's fidelity target, a mapping such as "
                                "target='{image_cosine_mean: 0.999}'; to copy a bundle somewhere, it is "
                                "`doit deploy bundle=NAME to=DEST`")
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]}= ({known[close[0]]})? " if close else ""
            raise VariableError(f"unknown variable {name}= on the command line: {hint}known: "
                                + ", ".join(sorted(known)))


def builds(words: list[str]) -> bool:
    """Whether the doit command may write to the artifacts directory (then it takes the lock)."""
    return not words or words[0] not in READ_ONLY_COMMANDS


def resume_on_interrupt(argv: list[str]) -> None:
    """On Ctrl-C, one line instead of a traceback: every file is written whole or not at all
    and doit has saved which tasks finished, so the same command again resumes."""
    previous = sys.excepthook
    command = shlex.join(["doit", *argv])

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            print(f"\ninterrupted: what finished is kept; `{command}` again resumes", file=sys.stderr, flush=True)
            return
        previous(kind, value, traceback)

    sys.excepthook = hook


class TimedReporter(ConsoleReporter):
    """doit's console output, plus each task's time as it ends and the total at the end.

    doit reports the end of the run from a `finally`, so on Ctrl-C too: then a task has
    started and not ended, and the run was interrupted, which `resume_on_interrupt` says.
    A total ("1 task run") printed before that line read as if the build had ended."""

    def __init__(self, outstream, options):
        super().__init__(outstream, options)
        self.started: dict[str, float] = {}
        self.ran = self.up_to_date = 0

    def execute_task(self, task):
        super().execute_task(task)
        self.started[task.name] = time.perf_counter()

    def _elapsed(self, task) -> float:
        return time.perf_counter() - self.started.pop(task.name, time.perf_counter())

    def add_success(self, task):
        super().add_success(task)
        seconds = self._elapsed(task)
        if task.actions and not task.name.startswith("_"):
            self.ran += 1
            self.write(f"   {task.title()}: {seconds:.1f} s\n")

    def add_failure(self, task, fail):
        super().add_failure(task, fail)
        self.write(f"   {task.title()}: failed after {self._elapsed(task):.1f} s\n")

    def skip_uptodate(self, task):
        super().skip_uptodate(task)
        self.up_to_date += 1

    def complete_run(self):
        super().complete_run()
        if self.started:  # a task that never ended: interrupted
            return
        self.write(f"doit: {self.ran} task{'s' if self.ran != 1 else ''} run, {self.up_to_date} up to date, "
                   f"{time.perf_counter() - STARTED:.1f} s in all\n")
