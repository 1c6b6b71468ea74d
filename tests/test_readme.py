"""What the user documentation promises: the README's Function-Gemma examples print what it
shows, its Pi set-up works in a deployed folder, CI runs its test command, and no page a user
reads carries commit hashes or issue numbers."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, doit

README = (ROOT / "README.md").read_text()
USER_PAGES = [ROOT / "README.md", ROOT / "runner" / "README.md", ROOT / "recipes" / "README.md",
              *sorted((ROOT / "bench").glob("*.md")), *sorted((ROOT / "recipes").glob("*/README.md"))]


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def shown_runs(program: str) -> list[tuple[str, list[str]]]:
    """(command, the stdout lines shown after it) of each `$ ` command running `program`."""
    runs = []
    for block in code_blocks(README):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ ") and program in line:
                shown = []
                for out in lines[i + 1:]:
                    if out.startswith("$ "):
                        break
                    shown.append(out)
                runs.append((line[2:], shown))
    return runs


@pytest.fixture(scope="module")
def demo_gemma(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("readme") / "artifacts"
    doit(artifacts, "recipe=recipes/demo-gemma.yaml", "flavors=[cpu]")
    return artifacts / "bundles" / "demo-gemma"


def test_the_readmes_gemma_example_prints_what_it_shows(demo_gemma):
    """The raw `runner gemma` example: a Function-Gemma prompt written by hand, a call out (it
    once showed a prompt the demo answers with `timertimer...`)."""
    runs = shown_runs("-m runner gemma artifacts/bundles/demo-gemma")
    assert runs, "the README shows no `runner gemma` run on the demo"
    for command, shown in runs:
        argv = shlex.split(command.replace("$'", "'"))  # bash's $'...' below, the rest as the shell splits it
        argv = [bytes(a, "utf-8").decode("unicode_escape") if "\\n" in a else a for a in argv]
        assert argv[:3] == [".venv/bin/python", "-m", "runner"]
        argv = [sys.executable, *argv[1:]]
        argv[argv.index("artifacts/bundles/demo-gemma")] = str(demo_gemma)
        run = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[:len(shown)] == shown, (run.stdout, shown)  # then the timings


def test_the_readmes_call_example_answers_as_shown(demo_gemma):
    """`runner call` with the bundle's own tools (no --tools) gives the call the README shows."""
    block = next(b for b in code_blocks(README) if "runner call artifacts/bundles/demo-gemma" in b)
    command = next(line for line in block.splitlines() if "runner call" in line)
    request = shlex.split(command)[-1]
    shown = next(b for b in code_blocks(README) if b.startswith("backend:") and '"name"' in b)
    call = next(line for line in shown.splitlines() if line.startswith("{"))
    run = subprocess.run([sys.executable, "-m", "runner", "call", str(demo_gemma), request], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == call and "(the bundle's; --tools FILE gives others)" in run.stderr


def test_the_pi_set_up_uses_only_what_a_deployed_folder_has(tmp_path):
    """`pip install -e '.[runner]'` failed in a deployed folder (no pyproject.toml there): every
    install command on the Pi reads files `doit deploy` carries."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed: doit deploy needs it")
    artifacts = tmp_path / "artifacts"
    doit(artifacts, "flavors=[cpu]")
    pi = tmp_path / "pi"
    doit(artifacts, "deploy", "bundle=demo-clip", f"to={pi}")
    guide = README[README.index("## From build host to Pi"):]
    installs = [line for block in code_blocks(guide) for line in block.splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        assert "pip install -e" not in line, line
        for name in re.findall(r"-r (\S+)", line):
            assert (pi / name).is_file(), f"{name} is not in the deployed folder ({line})"
    assert not re.search(r"pip install -e '\.\[runner", (ROOT / "runner" / "README.md").read_text())


def test_ci_runs_the_readmes_test_command():
    command = README[README.index("**Run every test**"):]
    command = code_blocks(command)[0].strip()
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == command


def test_user_pages_carry_no_commit_hashes_or_issue_numbers():
    for page in USER_PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            assert not re.search(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b|[Ii]ssue #?\d+|#\d+\b",
                                 line), f"{page.relative_to(ROOT)}:{n}: {line}"
