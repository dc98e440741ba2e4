"""The cache CLI: ls, show, gc, clear on a real store in a temp directory."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from dmlsys.workflow import MemoStore
from dmlsys.workflow.cli import main, parse_duration, parse_size


def test_duration_and_size_parsing():
    assert parse_duration("90") == 90 and parse_duration("30m") == 1800 and parse_duration("7d") == 7 * 86400
    assert parse_size("1024") == 1024 and parse_size("500M") == 500 << 20 and parse_size("2GB") == 2 << 30
    with pytest.raises(argparse.ArgumentTypeError, match="duration"):
        parse_duration("soon")
    with pytest.raises(argparse.ArgumentTypeError, match="size"):
        parse_size("big")


def test_ls_show_gc_clear(tmp_path, capsys):
    root = str(tmp_path)
    with MemoStore(root) as store:
        store.put("ab" * 16, "ingest", b"x" * 2000)
        store.put("cd" * 16, "train", [1, 2, 3])
    assert main(["cache", "--root", root, "ls"]) == 0
    out = capsys.readouterr().out
    assert "ingest" in out and "train" in out and "2 entries" in out
    assert main(["cache", "--root", root, "show", "abab"]) == 0
    out = capsys.readouterr().out
    assert "ab" * 16 in out and "ingest" in out
    assert main(["cache", "--root", root, "show", "zz"]) == 1
    assert "no entry" in capsys.readouterr().out
    assert main(["cache", "--root", root, "gc", "--max-bytes", "100", "--dry-run"]) == 0
    assert "would remove 1" in capsys.readouterr().out
    assert main(["cache", "--root", root, "gc", "--max-bytes", "100"]) == 0
    capsys.readouterr()
    with MemoStore(root) as store:
        assert [e.step for e in store.entries()] == ["train"]
    assert main(["cache", "--root", root, "clear", "--yes"]) == 0
    with MemoStore(root) as store:
        assert store.entries() == []


def test_module_help_runs():
    out = subprocess.run([sys.executable, "-m", "dmlsys.workflow", "cache", "gc", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--max-age" in out and "--max-bytes" in out


def test_help_names_the_command_the_user_typed(capsys):
    """``python -m dmlsys.cluster cache`` hands over to this CLI: its --help must say so."""
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "--help"], prog="python -m dmlsys.cluster")
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert usage.startswith("usage: python -m dmlsys.cluster cache")
    assert "dmlsys.workflow" not in usage
