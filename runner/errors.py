"""The one base class of every error a user can cause and fix.

A bad file (checkpoint, template, bundle, recipe, image), a missing tool or package, a
wrong argument: each is a subclass of `UserError` whose message is one line naming the
file (or argument) and what is wrong. The command lines (`doit`, `python -m runner`,
`python -m prepare`) catch `UserError` and `OSError` and print that line (exit 2); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something a user can fix; the message names the file or argument and the problem."""
