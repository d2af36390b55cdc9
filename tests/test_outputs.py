"""pisam_jax.outputs: all-or-nothing writes, modes from the umask, folders replaced without losing either, and
temporaries of killed runs removed by the next run (and only those)."""

import os
import stat
import subprocess
import sys

import pytest

from pisam_jax import outputs


@pytest.fixture()
def umask():
    """Sets the process umask for a test and restores it after."""
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def modes(root):
    """{relative path: permission bits} of everything under ``root`` (root itself as ".")."""
    out = {".": stat.S_IMODE(os.stat(root).st_mode)}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            out[os.path.relpath(p, root)] = stat.S_IMODE(os.stat(p).st_mode)
    return out


def dead_pid():
    """The pid of a process that has exited (reaped), so ``os.kill(pid, 0)`` fails."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("mask, file_mode, folder_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                         (0o002, 0o664, 0o775)])
def test_files_and_folders_take_their_mode_from_the_umask(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    assert outputs.umask() == mask
    outputs.write_files({tmp_path / "a" / "b" / "x.bin": b"1", tmp_path / "y.bin": b"2"})
    tmp = outputs.temp_folder_beside(tmp_path / "model")
    outputs.write_file(tmp / "config.json", b"{}")
    outputs.replace_folder(tmp, tmp_path / "model")
    got = modes(tmp_path)
    del got["."]  # made by pytest
    assert got == {"a": folder_mode, "a/b": folder_mode, "a/b/x.bin": file_mode, "y.bin": file_mode,
                   "model": folder_mode, "model/config.json": file_mode}


def test_write_files_is_all_or_nothing(tmp_path):
    (tmp_path / "old.png").write_bytes(b"old")
    (tmp_path / "blocker").write_bytes(b"a file where a folder is needed")
    with pytest.raises(outputs.OutputError, match="blocker"):
        outputs.write_files({tmp_path / "old.png": b"new", tmp_path / "new" / "n.png": b"n",
                             tmp_path / "blocker" / "x.png": b"x"})
    assert (tmp_path / "old.png").read_bytes() == b"old"  # the first target was not replaced
    assert sorted(os.listdir(tmp_path)) == ["blocker", "old.png"]  # no temporary, no half-made folder


def test_check_parent_names_the_problem(tmp_path):
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(outputs.OutputError, match=r"--out .*f/x/y.png: .*f is a file, not a folder"):
        outputs.check_parent(tmp_path / "f" / "x" / "y.png", "--out")
    with pytest.raises(outputs.OutputError, match="cannot write in /proc"):  # unwritable even for root
        outputs.check_parent("/proc/pisam-test/x.png")
    outputs.check_parent(tmp_path / "new" / "deeper" / "x.png")  # missing folders can be made
    assert sorted(os.listdir(tmp_path)) == ["f"]  # the checks leave nothing


def test_replace_folder_swaps_and_removes_only_the_old_one(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("old")
    (tmp_path / "neighbour.txt").write_text("mine")
    tmp = outputs.temp_folder_beside(tmp_path / "m")
    (tmp / "new.txt").write_text("new")
    outputs.replace_folder(tmp, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m", "neighbour.txt"]
    assert os.listdir(tmp_path / "m") == ["new.txt"]


def test_clean_stale_removes_only_temporaries_of_gone_processes(tmp_path):
    gone, host = dead_pid(), outputs._HOST
    names = {
        f".model.tmp-{host}-{gone}-0123abcd": "stale",  # a killed save
        f".model.tmp-{host}-{os.getpid()}-0123abcd": "in use by this process",
        f".model.tmp-{host}-1-0123abcd": "pid 1 is alive",
        f".model.tmp-otherhost-{gone}-0123abcd": "another host's: cannot tell",
        ".model.tmp-a1b2c3_d": "stale (the mkdtemp name of earlier versions)",
        f".other.tmp-{host}-{gone}-0123abcd": "stale, for another target",
        ".model.notes": "not a temporary",
        "model": "the target",
    }
    for n in names:
        (tmp_path / n).mkdir()
    removed = outputs.clean_stale(tmp_path, "model")
    assert sorted(p.name for p in removed) == sorted([f".model.tmp-{host}-{gone}-0123abcd", ".model.tmp-a1b2c3_d"])
    outputs.clean_stale(tmp_path)  # every target
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, why in names.items() if not why.startswith("stale"))


def test_clean_stale_puts_back_a_folder_moved_aside(tmp_path):
    """Killed between the two renames of replace_folder: the old folder comes back, or goes if the new one is in."""
    gone, host = dead_pid(), outputs._HOST
    aside = tmp_path / f".m.old-{host}-{gone}-0123abcd"
    aside.mkdir()
    (aside / "x").write_text("old")
    outputs.clean_stale(tmp_path, "m")
    assert os.listdir(tmp_path) == ["m"] and (tmp_path / "m" / "x").read_text() == "old"
    aside.mkdir()
    outputs.clean_stale(tmp_path, "m")
    assert os.listdir(tmp_path) == ["m"]
