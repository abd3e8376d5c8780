"""The command line's surface: every command is listed, help works, errors are one line."""
from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from ldmrt.cli import app

COMMANDS = ("export", "build", "generate", "bench", "inspect")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output, command


def test_each_command_has_help() -> None:
    for command in COMMANDS:
        result = CliRunner().invoke(app, [command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output


def test_console_script_runs() -> None:
    """`ldmrt --help` through the installed entry point (a new process, as a user runs it)."""
    done = subprocess.run([sys.executable, "-c", "from ldmrt.cli import app; app()", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "export" in done.stdout


def test_missing_bundle_is_a_one_line_error(tmp_path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
