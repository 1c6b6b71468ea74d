"""What dodo.py adds to doit's own command line, so that `doit` works on the first try.

- Variables: doit passes any `name=value` to the tasks and ignores the ones nobody reads,
  so `doit bacth=4` built with the recipe's batch and said nothing. `check_command_line`
  refuses a name no task reads, naming the closest known one.
- Task names: doit checks them only after it has asked every task for its description,
  which needs the recipe and, for a build, the artifacts directory's lock: `doit verfy`
  waited for another build, then said "Invalid parameter". `check_command_line` refuses an
  unknown task at once, naming the closest one; `doit TASK --help` prints what the task does
  (doit itself refused the option).
- Ctrl-C: doit saves the state of the tasks that finished, then lets KeyboardInterrupt
  through, and Python printed 65-83 lines of traceback. `resume_on_interrupt` prints one
  line saying that running the same command again resumes.
- The lock: one build at a time per artifacts directory (prepare/store.py), but commands
  that only read (`doit list`, `help`, `info`, `dumpdb`) need not wait for a build.
  `Build` takes it when a task creator first needs the recipe, not when dodo.py is
  imported: by then doit has read its command line and dodo.py has checked it.
- Time: `TimedReporter` is doit's console reporter plus each task's time as it ends and
  the total at the end.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from doit import get_var
from doit.cmd_base import DodoTaskLoader, DoitCmdBase
from doit.cmdparse import CmdOption, CmdParse, CmdParseError
from doit.doit_cmd import DoitMain
from doit.reporter import ConsoleReporter

from runner.errors import UserError

from .recipe import DEFAULT_RECIPE, KEYS, Recipe, load_recipe
from .stages.templates import TemplatePlan, Toolchain, plan, recipe_shapes
from .store import ARTIFACTS, Store, lock_artifacts, remove_leftovers

STARTED = time.perf_counter()  # dodo.py imports this module first: about when doit started
READ_ONLY_COMMANDS = ("list", "help", "info", "dumpdb", "tabcompletion")
COMMANDS = {command.get_name(): command for command in DoitMain.DOIT_CMDS}
NO_TASK_WORDS = ("dumpdb", "tabcompletion")  # commands whose words are not task names
HELP_OPTIONS = ("-h", "--help")


class VariableError(UserError):
    """A command-line variable no task reads, or one given where another was meant."""


class TaskNameError(UserError):
    """A word on the command line that names no task."""


@dataclass
class CommandLine:
    """doit's own reading of its arguments: `name=value` (not starting with `-`) is a
    variable; the first other word, if it is one of doit's commands, the command (else
    `run`); the remaining words, less the command's options, task names."""

    variables: dict[str, str]
    command: str
    words: list[str]
    help: bool = False  # `doit TASK --help`, which doit's run command does not take

    @classmethod
    def read(cls, argv: list[str]) -> "CommandLine":
        loader = CmdParse([CmdOption(o) for o in DodoTaskLoader.cmd_options])
        try:
            _, args = loader.parse_only(argv)
        except CmdParseError:  # doit says what is wrong, later
            args = list(argv)
        variables = dict(a.split("=", 1) for a in args if not a.startswith("-") and "=" in a)
        args = [a for a in args if a.startswith("-") or "=" not in a]
        command = args.pop(0) if args and args[0] in COMMANDS else "run"
        asked = command == "run" and any(a in HELP_OPTIONS for a in args)
        args = [a for a in args if not (asked and a in HELP_OPTIONS)]
        kind = COMMANDS[command]
        options = [*kind.cmd_options, *(DoitCmdBase.base_options if issubclass(kind, DoitCmdBase) else ()),
                   *DodoTaskLoader.cmd_options]
        try:
            _, words = CmdParse([CmdOption(o) for o in options]).parse(args)
        except CmdParseError:  # doit says what is wrong, later
            words = [a for a in args if not a.startswith("-")]
        return cls(variables, command, words, asked)

    @property
    def builds(self) -> bool:
        """Whether the command may write to the artifacts directory (then it takes the lock)."""
        return self.command not in READ_ONLY_COMMANDS


def check_command_line(line: CommandLine, variables: dict[str, str], tasks: dict[str, Callable]) -> None:
    """Refuse a variable no task reads (`variables` maps each name to what reads it) and a
    word that names no task (`tasks`: name -> task creator) or, after `help`, no command."""
    for name, value in line.variables.items():
        if name == "target" and not value.lstrip().startswith("{"):
            raise VariableError(f"target={value}: `target` is the recipe's fidelity target, a mapping such as "
                                "target='{image_cosine_mean: 0.999}'; to copy a bundle somewhere, it is "
                                "`doit deploy bundle=NAME to=DEST`")
        if name not in variables:
            close = difflib.get_close_matches(name, variables, n=1)
            hint = f"did you mean {close[0]}= ({variables[close[0]]})? " if close else ""
            raise VariableError(f"unknown variable {name}= on the command line: {hint}known: "
                                + ", ".join(sorted(variables)))
    if line.command in NO_TASK_WORDS:
        return
    known = list(tasks) + (list(COMMANDS) if line.command == "help" else [])
    for word in line.words:
        base = word.split(":", 1)[0]  # a subtask (`template:256x256b1`) is checked by doit, with the recipe
        if base in known or ("*" in word and fnmatch.filter(known, base)):
            continue
        close = difflib.get_close_matches(base, known, n=1)
        raise TaskNameError(f"no task {word!r}" + (f"; did you mean {close[0]}?" if close else "")
                            + f" (tasks: {', '.join(sorted(tasks))}; `doit list` says what each does)")


def describe_tasks(line: CommandLine, tasks: dict[str, Callable]) -> str:
    """`doit TASK --help`: what each named task does, its creator's whole docstring."""
    bases = [w.split(":", 1)[0] for w in line.words]
    names = [name for base in bases for name in (fnmatch.filter(sorted(tasks), base) if "*" in base else [base])]
    names = names or sorted(tasks)
    return "\n\n".join(f"doit {name}: {inspect.getdoc(tasks[name])}" for name in dict.fromkeys(names))


class Build:
    """What the tasks of one doit command share: the recipe (with the command line's
    overrides), the store and the template plans, each made when a task creator first asks.

    doit asks for every task, `doit list` too, after it has read its command line and
    opened its dependency file; the sqlite3 backend reads a task's record only when it
    checks that task, after all of them are made. So for a command that writes, taking the
    lock before reading the recipe makes a second build wait before it reads anything the
    first one writes, and then find the first one's work done. Holding the lock, every
    temporary file in the artifacts directory is a killed build's, and goes."""

    def __init__(self, writes: bool):
        self.writes = writes
        self.store = Store()
        self.lock: int | None = None

    @functools.cached_property
    def recipe(self) -> Recipe:
        if self.writes:
            self.lock = lock_artifacts(ARTIFACTS)
            leftovers = remove_leftovers(ARTIFACTS)
            if leftovers:
                print(f"removed {len(leftovers)} temporary file(s) left by an interrupted build in {ARTIFACTS}")
        overrides = {k: get_var(k) for k in KEYS if get_var(k) is not None}
        return _or_exit(load_recipe, get_var("recipe"), overrides)

    @functools.cached_property
    def plans(self) -> list[TemplatePlan]:
        """One per template the recipe needs; finding the compiler runs it (`--version`)."""
        return _or_exit(lambda: plan(self.recipe, recipe_shapes(self.recipe), Toolchain.find(self.recipe)))


def state_name(variables: dict[str, str]) -> str:
    """Whose record of tasks doit keeps (prepare/paths.py `doit_state_path`), known before the
    recipe is read: the `name=` given on the command line, else the recipe file's name
    (each shipped recipe's `name`). The task names are the same for every recipe; a record
    shared by two recipes costs rebuilds, never a wrong result."""
    name = variables.get("name", "")
    if name and Path(name).name == name and not name.startswith("."):
        return name
    return Path(variables.get("recipe") or DEFAULT_RECIPE).stem


def _or_exit(fn, *args):
    """fn(*args), or for a user's error one line and exit 2 (inside doit's task loading, where
    doit would print a traceback)."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


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
