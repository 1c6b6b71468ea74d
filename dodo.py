"""doit tasks of the build host. Each task is a thin call into `prepare/`.

    doit                      build the default (the demo)
    doit list                 every task
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent
FIXTURES = ROOT.parent / "shared" / "fixtures" / "edgetpu"

DOIT_CONFIG = {"default_tasks": ["inspect_fixture"], "verbosity": 2}


def task_inspect_fixture():
    """Decode the real compiled fixture and compare it with its uncompiled model."""
    compiled, uncompiled = FIXTURES / "dense_256_edgetpu.tflite", FIXTURES / "dense_256.tflite"

    def run():
        if not compiled.is_file():
            print(f"no compiled fixture at {compiled}: nothing to inspect")
            return True
        from prepare.inspect import format_text, inspect
        print(format_text(inspect(compiled, uncompiled)))
        return True

    return {"actions": [run], "uptodate": [False]}
