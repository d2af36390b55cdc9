"""Writing outputs safely: atomic files and folders, modes from the umask, temporaries that never outlive a run.

Every command writes through here, so that

* nothing is half-written: a file or folder is written under a temporary name beside its target, then renamed;
* nothing that was not ours is deleted: replacing a folder moves the old one aside, renames the new one in, and
  only then removes the old one (the caller decides whether the old one may be replaced);
* outputs honour the umask (files 0644 and folders 0755 under the usual 0022), unlike ``tempfile``'s 0600/0700;
* a temporary left by a killed run is removed by the next run: temporaries are named
  ``.NAME.tmp-HOST-PID-RANDOM`` (and a folder moved aside ``.NAME.old-HOST-PID-RANDOM``), so a later run on the
  same host can tell that the process which made one has gone.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path


class OutputError(ValueError):
    """An output that cannot be written where asked; the message names the place and what to do."""


def umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, hence the /proc path first)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def folder_mode() -> int:
    return 0o777 & ~umask()


# -- temporary names --------------------------------------------------------------------------------------

_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def _temp_name(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


# ours: .NAME.tmp-HOST-PID-HEX / .NAME.old-HOST-PID-HEX; before: .NAME.tmp-XXXXXXXX (mkdtemp, no owner recorded)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_LEGACY_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stale(entry: str) -> tuple[str, str] | None:
    """(name, kind) when ``entry`` is a temporary of ours whose process has gone, else None."""
    m = _TEMP.match(entry)
    if m:
        pid = int(m["pid"])
        # another host's processes cannot be checked from here; this process's own are in use
        if m["host"] != _HOST or pid == os.getpid() or _alive(pid):
            return None
        return m["name"], m["kind"]
    m = _LEGACY_TEMP.match(entry)
    return (m["name"], "tmp") if m else None


def clean_stale(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries that killed runs left in ``folder`` (for the target ``name`` only, if given).

    A ``.tmp`` is removed; an ``.old`` (a replaced folder moved aside) is removed when its target exists, and
    renamed back to its target when the run died between the two renames. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in os.listdir(folder):
        stale = _stale(entry)
        if stale is None or (name is not None and stale[0] != name):
            continue
        path, target = folder / entry, folder / stale[0]
        if stale[1] == "old" and not os.path.lexists(target):
            os.replace(path, target)
            continue
        _remove(path)
        removed.append(path)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


# -- where outputs go -------------------------------------------------------------------------------------


def check_parent(path: str | os.PathLike, flag: str = "") -> None:
    """Raises OutputError unless the folders above ``path`` exist or can be made, and can be written in."""
    _check_writable(Path(path).absolute().parent, Path(path).absolute(), flag)


def check_folder(path: str | os.PathLike, flag: str = "") -> None:
    """Raises OutputError unless ``path`` is a folder that can be written in, or can be made."""
    _check_writable(Path(path).absolute(), Path(path).absolute(), flag)


def _check_writable(folder: Path, path: Path, flag: str) -> None:
    """The nearest existing of ``folder`` and its ancestors must be a folder this process can create entries in
    (checked by making one: ``os.access`` says yes to root on read-only places)."""
    what = f"{flag} {path}" if flag else str(path)
    ancestor = folder
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise OutputError(f"{what}: {ancestor} is a broken symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{what}: {ancestor} is a file, not a folder; choose another place")
    probe = ancestor / _temp_name("probe")
    try:
        os.mkdir(probe)
    except OSError as e:
        raise OutputError(f"{what}: cannot write in {ancestor} ({e.strerror}); choose another place") from None
    os.rmdir(probe)


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Creates the missing folders above ``path`` (mode from the umask); returns them, outermost first."""
    missing = []
    parent = Path(path).absolute().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    try:
        for d in reversed(missing):
            os.mkdir(d, folder_mode())
            created.append(d)
    except OSError as e:
        remove_created(created)
        raise OutputError(f"{path}: cannot create the folder {d} ({e.strerror}); choose another place") from None
    return created


def remove_created(folders: list[Path]) -> None:
    """Removes folders made by ``make_parents`` again, innermost first, where still empty (a failed write)."""
    for d in reversed(folders):
        try:
            os.rmdir(d)
        except OSError:
            return


# -- files ------------------------------------------------------------------------------------------------


def write_files(contents: Mapping[str | os.PathLike, bytes]) -> list[Path]:
    """Writes several files all or nothing: each to a temporary beside it, then all renamed into place.

    Missing parent folders are created (and removed again on failure). Files get mode ``0666 & ~umask``.
    """
    temps: list[tuple[Path, Path]] = []
    created: list[Path] = []
    try:
        for target, data in contents.items():
            target = Path(target)
            created += make_parents(target)
            tmp = target.parent / _temp_name(target.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, file_mode())
            temps.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for tmp, target in temps:
            os.replace(tmp, target)
    except OSError as e:
        for tmp, _ in temps:
            _remove(tmp)
        remove_created(created)
        where = e.filename or next(iter(contents), "")
        raise OutputError(f"cannot write {where}: {e.strerror or e}") from None
    except BaseException:
        for tmp, _ in temps:
            _remove(tmp)
        remove_created(created)
        raise
    return [target for _, target in temps]


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` to ``path`` atomically (see ``write_files``)."""
    return write_files({path: data})[0]


# -- folders ----------------------------------------------------------------------------------------------


def temp_folder_beside(path: str | os.PathLike) -> Path:
    """A new empty folder ``.NAME.tmp-HOST-PID-RANDOM`` beside ``path`` (mode from the umask)."""
    path = Path(path)
    tmp = path.parent / _temp_name(path.name)
    try:
        os.mkdir(tmp, folder_mode())
    except OSError as e:
        raise OutputError(f"cannot write in {path.parent} ({e.strerror}); choose another place") from None
    return tmp


def replace_folder(tmp: Path, path: Path) -> None:
    """Moves the finished folder ``tmp`` to ``path``; an existing ``path`` is moved aside first, removed last.

    The caller has decided that the old ``path`` may go. At every moment either the old or the new folder is
    at ``path`` (or, for an instant, beside it as ``.NAME.old-*``, which ``clean_stale`` puts back).
    """
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    old = path.parent / _temp_name(path.name, "old")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise
    shutil.rmtree(old)
