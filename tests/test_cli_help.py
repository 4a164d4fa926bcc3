"""Every command has help text with an example (as sqlite-utils checks for its own CLI)."""

import pytest
import typer.main
from typer.testing import CliRunner

from distill_app.cli import app

COMMAND = typer.main.get_command(app)


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a sub-group (typer vendors its own click classes)
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,)


@pytest.mark.parametrize("path", list(_commands(COMMAND)), ids=" ".join)
def test_every_command_has_help_with_example(path):
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0
    assert "Example:" in res.output, f"`distill {' '.join(path)} --help` has no example"


def test_spec_commands_exist():
    names = {" ".join(p) for p in _commands(COMMAND)}
    assert {"harvest", "train", "eval", "demo", "cache stats", "cache labels", "cache export"} <= names


def test_bad_usage_exits_2():
    res = CliRunner().invoke(app, ["harvest", "--images", ".", "--concurrency", "0"])
    assert res.exit_code == 2
