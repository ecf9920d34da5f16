"""The ``inventory`` command as a user installs it: every subcommand listed, every option's
default shown, and the load harness naming its extra instead of failing at import.

A plain install (no extras) is simulated by marking the ``bench`` extra's modules absent in
``sys.modules`` of a child interpreter; scripts/test also checks a real plain install.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from benchmarks import EXTRA_MODULES, extra_hint
from shard_router.cli import build_parser, main

SUBCOMMANDS = (
    "up",
    "router",
    "shard",
    "migrate",
    "import",
    "bench",
    "bench-events",
    "bench-ingest",
    "bench-hot",
)
# A child interpreter starts in about half a second; this is generous for a shared machine.
CHILD_TIMEOUT_S = 60.0
WITHOUT_EXTRA = (
    "import sys; sys.modules.update(dict.fromkeys({modules!r}));"
    "from shard_router.cli import main; main(sys.argv[1:])"
)


def _help_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def _run_without_extra(*argv: str) -> subprocess.CompletedProcess[str]:
    code = WITHOUT_EXTRA.format(modules=list(EXTRA_MODULES))
    return subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )


def _option_blocks(help_text: str) -> dict[str, str]:
    """``--flag`` -> its help lines, from a parser's --help output."""
    blocks: dict[str, str] = {}
    current = ""
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -") and not line.startswith("   "):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current and line.startswith("    ") and stripped:
            blocks[current] += " " + stripped
        else:
            current = ""
    return blocks


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help_of([], capsys)
    for command in SUBCOMMANDS:
        assert f"    {command}" in text, text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_of_every_subcommand_shows_its_default(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help_of([command], capsys)
    parser = build_parser(command)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = [
        action.option_strings[0]
        for action in subparsers.choices[command]._actions
        if action.option_strings and action.option_strings[0] != "-h"
    ]
    assert options, text
    blocks = _option_blocks(text)
    for option in options:
        block = blocks.get(option, "")
        assert "default" in block.lower() or "(required" in block, f"{option}: {block!r}"


def test_up_help_names_the_new_launcher_options(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _option_blocks(_help_of(["up"], capsys))
    assert "(default: --port + 10)" in blocks["--shard-ports"]
    assert "(default: file)" in blocks["--logs"]
    assert "DATA_DIR/logs/inventory.log" in blocks["--log-file"]


def test_defaults_from_the_environment_are_shown_but_never_a_url(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("INVENTORY_PORT", "6000")
    monkeypatch.setenv("INVENTORY_DATABASE_URL", "postgresql://user:secret@db/inventory")
    text = _help_of(["up"], capsys)
    assert "(default: 6000)" in _option_blocks(text)["--port"]
    assert "secret" not in text


def test_service_subcommands_import_nothing_of_the_bench_extra() -> None:
    code = (
        "import sys; from shard_router.cli import build_parser;"
        "[build_parser(c) for c in ('up', 'router', 'shard', 'migrate', 'bench')];"
        f"print(sorted(m for m in {list(EXTRA_MODULES)!r} if m in sys.modules))"
    )
    found = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=True,
    )
    assert found.stdout.strip() == "[]"


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_without_the_extra_every_help_still_works(command: str) -> None:
    answer = _run_without_extra(command, "--help")
    assert answer.returncode == 0, answer.stderr
    assert "Traceback" not in answer.stderr
    if command.startswith("bench"):
        assert extra_hint(f"inventory {command}") in " ".join(answer.stdout.split())


@pytest.mark.parametrize(
    "argv",
    [
        ["bench"],
        ["bench", "--smoke"],
        ["bench-events"],
        ["bench-events", "--rate", "5", "x"],
        ["bench-ingest", "--rates", "5"],
        ["bench-hot", "--callers", "5"],
    ],
)
def test_without_the_extra_a_harness_run_says_which_extra_in_one_line(argv: list[str]) -> None:
    answer = _run_without_extra(*argv)
    assert answer.returncode == 2
    assert answer.stdout == ""
    assert answer.stderr == extra_hint(f"inventory {argv[0]}") + "\n"


def test_without_the_extra_python_m_benchmarks_says_which_extra() -> None:
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({list(EXTRA_MODULES)!r}));"
        "import runpy; runpy.run_module('benchmarks', run_name='__main__')"
    )
    answer = subprocess.run(
        [sys.executable, "-c", code, "--smoke"],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert answer.returncode == 2
    assert answer.stderr == extra_hint("python -m benchmarks") + "\n"


def test_unknown_arguments_of_a_service_subcommand_are_still_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["migrate", "--database-url", "postgresql://x@/y", "--no-such-flag"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_every_package_directory_is_packaged() -> None:
    """An editable install finds every module; a plain install only the listed packages."""
    root = Path(__file__).resolve().parent.parent
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    roots = {name: root / setuptools["package-dir"].get(name, name) for name in listed}
    found = set()
    for top in (name for name in listed if "." not in name):
        for init in roots[top].rglob("__init__.py"):
            if "__pycache__" not in init.parts:
                relative = init.parent.relative_to(roots[top]).parts
                found.add(".".join((top, *relative)))
    assert found == listed
