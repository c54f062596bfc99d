"""The ``linreg`` console command: top-level help, version, dispatch and every subcommand's --help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from linreg.cli import SUBCOMMANDS, main


def test_top_level_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "linreg.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name, (_, desc) in SUBCOMMANDS.items():
        assert f"  {name}" in out.stdout and desc in out.stdout
    # bare `linreg` prints the same help; --version prints the package version
    bare = subprocess.run([sys.executable, "-m", "linreg.cli"], capture_output=True, text=True, timeout=120)
    assert bare.returncode == 0 and bare.stdout == out.stdout
    from linreg import __version__

    ver = subprocess.run([sys.executable, "-m", "linreg.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert ver.stdout.strip() == __version__


def test_unknown_subcommand_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["anallyze"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'anallyze'" in err and "analyze" in err


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_every_subcommand_help_documents_its_options(name, capsys, monkeypatch):
    import argparse

    shown = []
    original = argparse.ArgumentParser.print_help

    def record(self, file=None):
        shown.append(self)
        return original(self, file)

    monkeypatch.setattr(argparse.ArgumentParser, "print_help", record)
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    (parser,) = shown
    assert parser.prog.startswith("linreg") and parser.description
    undocumented = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
    assert not undocumented, f"linreg {name}: options without help: {undocumented}"
