"""`usae ... --help` as a first-time user reads it at 80 columns: no type placeholders of Typer's
(`<bool>` after a flag, `<str>`, `{run}`), values named by what they take, and `usae train
--help` short enough to read."""

from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from app.cli import cli


def _commands(group, path=()):
    """Every command's words (`("user", "add")`) under `group`, groups included."""
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from _commands(command, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(cli)))


def _help(*words: str) -> str:
    result = CliRunner().invoke(cli, [*words, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("words", COMMANDS, ids=lambda words: " ".join(words) or "usae")
def test_help_shows_no_type_placeholders(words):
    text = _help(*words)
    assert not re.search(r"<(bool|str|int|float|path)[^>]*>|list\[", text), text
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage, usage


def test_values_are_named_by_what_they_take():
    flat = " ".join(_help("train").split())
    for option, metavar in (("--store", "STORE"), ("--out", "RUN"), ("--init-from", "RUN"), ("--steps", "N"),
                            ("--lr", "NUMBER"), ("--data-dir", "DIR")):
        assert f"{option} {metavar} " in flat, option
    assert "Usage: usae mine [OPTIONS] RUN " in " ".join(_help("mine").split())
    flat = " ".join(_help("extract").split())
    assert "--weights NAME=PATH " in flat and "--grid HxW " in flat and "--images FOLDER " in flat


def test_flags_off_by_default_are_one_switch_and_those_on_keep_their_off_switch():
    demo = _help("demo")
    assert "--small" in demo and "--no-small" not in demo
    assert "--no-serve" in demo and "--no-open" in demo
    # Hidden from the help, still accepted: a script that passes the off switch keeps working.
    usage = CliRunner().invoke(cli, ["train", "--no-resume", "--no-overwrite"])
    assert "No such option" not in usage.output and "Missing option '--store'" in usage.output


def test_train_help_fits_on_a_screen():
    """It was 121 lines at 80 columns, most of them --resume's and --init-from's explanations
    wrapped into a column 22 characters wide."""
    text = _help("train")
    assert len(text.splitlines()) <= 50, text
    assert "docs/formats.md" in text  # where the details went


def test_each_password_option_shows_its_own_command_reading_standard_input():
    """`usae user set-password --help` showed `... | usae user add NAME`, copied from `user add`."""
    for command in ("add", "set-password"):
        flat = " ".join(_help("user", command).replace("│", " ").split())
        example = re.search(r"`printf '%s\\n' \"\$PW\" \| (usae user [a-z-]+ NAME)`", flat)
        assert example and example.group(1) == f"usae user {command} NAME", flat


def test_demo_small_says_its_two_minutes_need_an_idle_machine():
    """As README and docs/benchmarks.md measured it: on a busy machine it takes longer."""
    flat = " ".join(_help("demo").replace("│", " ").split())
    assert "about two minutes on 2 CPU cores of an otherwise idle machine" in flat, flat


def test_an_older_typer_is_named_with_the_fix_instead_of_failing_in_the_help_set_up(monkeypatch, capsys):
    """Typer 0.2x has none of the parameter types the help formatting uses: every command failed
    with an AttributeError traceback (found running `usae demo` on a machine with an older Typer)."""
    import app.cli

    monkeypatch.setattr(app.cli.typer, "__version__", "0.20.1")
    monkeypatch.setattr("sys.argv", ["usae", "runs", "list"])
    with pytest.raises(SystemExit) as stop:
        app.cli.main()
    assert stop.value.code == 2
    assert "usae needs typer >= 0.29, this Python has 0.20.1: pip install -U 'typer>=0.29'" in capsys.readouterr().err
    assert [app.cli._typer_too_old(v) for v in ("0.29.0", "0.29.2", "0.30rc1", "1.0", "0.28.9")] == [
        False, False, False, False, True]
