"""Outputs land whole or not at all: a set of files, staged in a hidden folder, replaces
what the output folder holds only if every file can, and a failure leaves the folder and
the file system as they were."""
from __future__ import annotations

import os

import pytest

from quant_ops import fileio
from quant_ops.errors import QuantOpsError
from quant_ops.fileio import plain_name, staged_dir


def _write(folder, **files):
    for name, text in files.items():
        (folder / name).write_text(text)


def _listing(folder):
    return sorted((p.relative_to(folder).as_posix(), p.read_text() if p.is_file() else None)
                  for p in folder.rglob("*"))


def test_a_folder_where_an_output_goes_stops_every_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.json": "old a", "c.json": "old c"})
    (out / "b.json").mkdir()                         # in the way of one output
    before = _listing(out)
    with pytest.raises(QuantOpsError, match=r"b\.json: is a folder"):
        with staged_dir(out) as tmp:
            _write(tmp, **{"a.json": "new a", "b.json": "new b", "c.json": "new c"})
    assert _listing(out) == before                   # not one file replaced, nothing left


def test_a_failed_move_puts_back_what_it_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.json": "old a", "b.json": "old b"})
    before = _listing(out)
    real, calls = os.replace, []

    def flaky(src, dst):            # the new b.json cannot be moved in, once
        calls.append(dst)
        if ".staged" in str(src) and ".previous" not in str(src) \
                and str(dst).endswith("b.json") and len(calls) < 3:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", flaky)
    with pytest.raises(QuantOpsError, match="nothing was changed"):
        with staged_dir(out) as tmp:
            _write(tmp, **{"a.json": "new a", "b.json": "new b"})
    monkeypatch.setattr(fileio.os, "replace", real)
    assert _listing(out) == before and len(calls) > 2


def test_a_stop_signal_while_moving_in_puts_everything_back(tmp_path, monkeypatch):
    """SIGTERM/SIGINT arrive as exceptions (cli.common.Stopped, KeyboardInterrupt) at any
    point, also between two moves: the files replaced so far come back."""
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.json": "old a", "b.json": "old b"})
    before = _listing(out)
    real = os.replace

    def stopped(src, dst):
        if ".staged" in str(src) and ".previous" not in str(src) \
                and str(dst).endswith("b.json"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        with staged_dir(out) as tmp:
            _write(tmp, **{"a.json": "new a", "b.json": "new b"})
    monkeypatch.setattr(fileio.os, "replace", real)
    assert _listing(out) == before


def test_a_replaced_file_is_never_missing_for_a_reader(tmp_path, monkeypatch):
    """The old file stays at its name until the new one replaces it in one step."""
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.json": "old a"})
    real, seen = os.replace, []

    def watch(src, dst):
        if str(dst) == str(out / "a.json"):
            seen.append((out / "a.json").read_text())
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", watch)
    with staged_dir(out) as tmp:
        _write(tmp, **{"a.json": "new a"})
    assert seen == ["old a"] and (out / "a.json").read_text() == "new a"


def test_success_replaces_every_file_and_keeps_the_others(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.json": "old a", "keep.txt": "mine"})
    with staged_dir(out) as tmp:
        _write(tmp, **{"a.json": "new a", "b.json": "new b"})
    assert _listing(out) == [("a.json", "new a"), ("b.json", "new b"), ("keep.txt", "mine")]


def test_a_failed_run_removes_the_folders_it_made(tmp_path):
    out = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as tmp:
            _write(tmp, a="1")
            raise RuntimeError("the run failed")
    assert list(tmp_path.iterdir()) == []


def test_dot_dot_in_the_output_path_means_what_it_says(tmp_path):
    (tmp_path / "sub").mkdir()
    with staged_dir(tmp_path / "sub" / ".." / "result") as tmp:
        _write(tmp, a="1")
    assert (tmp_path / "result" / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result", "sub"]


def test_names_too_long_for_a_file_system_are_refused_by_name():
    assert plain_name("n" * 200) == "n" * 200
    with pytest.raises(QuantOpsError, match=r"export name 'n+\.\.\.' is 300 bytes long"):
        plain_name("n" * 300, "export name")
    with pytest.raises(QuantOpsError, match="at most 200"):
        plain_name("中" * 70)                        # 210 bytes in UTF-8
