"""The `xfast` console script dispatches to each subcommand's own parser."""
import pytest

from xfast.cli import main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "shards"):
        assert f"  {command}" in out


def test_unknown_command_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "shards"])
def test_subcommand_help_comes_from_its_parser(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: xfast {command}" in capsys.readouterr().out
