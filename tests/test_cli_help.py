"""``dlkunet --help`` answers without importing torch (its import alone takes seconds)."""
import subprocess
import sys

import pytest

_PROBE = """
import sys
from dlkunet import cli
try:
    cli.main({argv!r})
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""


def _run(argv):
    out = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_top_level_help_does_not_import_torch(argv):
    out = _run(argv)
    assert "torch imported: False" in out
    if argv == ["--help"]:
        assert "train" in out and "evaluate" in out and "info" in out


def test_a_sub_command_still_gets_its_arguments_and_defaults():
    out = _run(["train", "--help"])
    assert "--epochs" in out and "--lr-gamma" in out and "torch imported: True" in out
    from dlkunet.cli import build_parser

    args = build_parser().parse_args(["train", "--epochs", "3", "--lr", "0.5"])
    assert (args.epochs, args.lr, args.func.__name__) == (3, 0.5, "_train")
