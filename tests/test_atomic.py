"""timm_qconv.atomic: files and folders are replaced whole or not at all."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from timm_qconv import atomic
from timm_qconv.atomic import atomic_directory, atomic_write, resolve_directory


def _dead_pid() -> int:
    """The PID of a process that has exited (for names of leftovers from a killed writer)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("data", [b"\x00new bytes", "new text ü"])
def test_atomic_write_replaces_content_and_leaves_no_temp(tmp_path: Path, data: bytes | str) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")
    atomic_write(target, data)
    expected = data.encode() if isinstance(data, str) else data
    assert target.read_bytes() == expected, "the file should hold exactly the new data"
    assert _hidden(tmp_path) == [], f"temporary files left behind: {_hidden(tmp_path)}"


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_atomic_write_failure_keeps_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    target = tmp_path / "f.json"
    target.write_text("old")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, failing, boom)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old", "a failed write must leave the previous content"
    assert _hidden(tmp_path) == [], f"temporary files left behind: {_hidden(tmp_path)}"


def test_atomic_write_rejects_other_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="data=dict"):
        atomic_write(tmp_path / "f", {"a": 1})  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [], "nothing should be written"


def test_atomic_write_removes_temp_files_of_dead_writers(tmp_path: Path) -> None:
    stale = tmp_path / f".f.json.tmp-{_dead_pid()}-abc"
    stale.write_text("half")
    atomic_write(tmp_path / "f.json", "x")
    assert not stale.exists(), "a killed writer's temporary file should be cleaned up by the next write"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_atomic_directory_replaces_folder_and_keeps_other_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "notes.md").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("deep")
    with atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp != out, "the new folder is written beside the old one"
        (tmp / "a.txt").write_text("new a")
        assert (out / "a.txt").read_text() == "old a", "the old folder is untouched until the swap"
    assert (out / "a.txt").read_text() == "new a", "the new content should be in place"
    assert (out / "notes.md").read_text() == "mine", "files the new folder lacks should be kept"
    assert (out / "sub" / "x").read_text() == "deep", "sub-folders the new folder lacks should be kept"
    assert _hidden(tmp_path) == [], f"temporary folders left behind: {_hidden(tmp_path)}"


def test_atomic_directory_error_leaves_old_folder_and_removes_new_parents(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("half")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "old", "an interrupted write must leave the old folder"
    assert _hidden(tmp_path) == [], f"temporary folders left behind: {_hidden(tmp_path)}"

    deep = tmp_path / "new1" / "new2" / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(deep):
            raise RuntimeError("fails")
    assert not (tmp_path / "new1").exists(), "parent folders created by the failed write should be removed"


def test_atomic_directory_refuses_a_file(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("keep")
    with pytest.raises(NotADirectoryError, match="existing file"):
        with atomic_directory(file):
            pass
    assert file.read_text() == "keep", "the file must stay as it was"


def test_interrupted_two_rename_swap_is_readable_and_restored(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # What a kill between the two renames of the fallback swap leaves: the old folder aside, the new one unfinished.
    aside = tmp_path / f".out.old-{_dead_pid()}-abc"
    aside.mkdir()
    (aside / "a.txt").write_text("old")
    unfinished = tmp_path / f".out.tmp-{_dead_pid()}-def"
    unfinished.mkdir()
    assert resolve_directory(out) == aside, "readers should find the old folder while the path is missing"
    with atomic_directory(out) as tmp:
        assert (out / "a.txt").read_text() == "old", "the next write should first put the old folder back"
        (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt"], "old entries carried over, new added"
    assert _hidden(tmp_path) == [], f"leftovers of the dead writer remain: {_hidden(tmp_path)}"
    assert resolve_directory(out) == out, "an existing folder resolves to itself"
