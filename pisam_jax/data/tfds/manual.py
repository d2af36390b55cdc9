"""Finding a dataset's image and mask folders in a manual download folder: extracted, or inside a zip archive.

A dataset named in ``datasets.DATASETS`` is found where its folders (``DIS5K/DIS-TR/im`` and ``DIS5K/DIS-TR/gt``)
are, below the manual folder or inside a ``.zip`` at its top level, with up to ``MAX_PREFIX`` folders in front
(HQSeg-44K's ``data/cascade_psp/fss_all``). Extracted folders come first, then the archives in name order; the
first place that holds both folders is used. Archives are read in place, never extracted.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import BinaryIO

from pisam_jax.data import datasets

MAX_PREFIX = 2  # folders in front of a dataset's own path, e.g. "data/cascade_psp/"
IGNORED = ("__MACOSX",)  # macOS resource forks in zips


class ZipFiles:
    """The folders of a zip archive as ``datasets.Files``: paths are '<archive path>/<member path>'."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as e:
            raise datasets.DatasetError(f"{path}: not a readable zip archive ({e}); download it again") from None
        self._dirs: dict[str, list[str]] = {"": []}  # member folder -> its file names
        for info in self._zip.infolist():
            member = info.filename.rstrip("/")
            if not member or member.split("/", 1)[0] in IGNORED:
                continue
            folder, _, name = member.rpartition("/")
            if info.is_dir():
                self._dirs.setdefault(member, [])
            else:
                self._dirs.setdefault(folder, []).append(name)
            while folder:  # parents of members without entries of their own
                folder = folder.rpartition("/")[0]
                self._dirs.setdefault(folder, [])

    def _member(self, path: str) -> str:
        if path == self.path:
            return ""
        if not path.startswith(self.path + "/"):
            raise ValueError(f"{path} is not inside {self.path}")
        return path[len(self.path) + 1:]

    def isdir(self, path: str) -> bool:
        return self._member(path) in self._dirs

    def files(self, folder: str) -> list[str]:
        return list(self._dirs[self._member(folder)])

    def open(self, path: str) -> BinaryIO:
        return self._zip.open(self._member(path))

    def read_bytes(self, path: str) -> bytes:
        return self._zip.read(self._member(path))

    def folders_ending_with(self, rel: str) -> list[str]:
        """Member folders equal to ``rel`` or ending with '/' + ``rel``, at most ``MAX_PREFIX`` deep in front."""
        out = []
        for d in self._dirs:
            if d == rel or (d.endswith("/" + rel) and d[: -len(rel) - 1].count("/") < MAX_PREFIX):
                out.append(d)
        return sorted(out)


def read_bytes(files: datasets.Files, path: str) -> bytes:
    """A file's bytes, from the local file system or a ``ZipFiles``."""
    if isinstance(files, ZipFiles):
        return files.read_bytes(path)
    with open(path, "rb") as f:
        return f.read()


@dataclasses.dataclass(frozen=True)
class Found:
    """Where a dataset's folders are: ``image_dir`` and ``gt_dir`` paths in ``files``."""

    files: datasets.Files
    image_dir: str
    gt_dir: str
    where: str  # the extracted folder or the archive, for messages


def _local_prefixes(root: str) -> list[str]:
    """'' and the folders below ``root`` up to ``MAX_PREFIX`` deep (relative, sorted)."""
    out, level = [""], [""]
    for _ in range(MAX_PREFIX):
        nxt = []
        for rel in level:
            try:
                entries = sorted(os.scandir(os.path.join(root, rel)), key=lambda e: e.name)
            except OSError:
                continue
            nxt += [os.path.join(rel, e.name) for e in entries
                    if e.is_dir() and not e.name.startswith(".") and e.name not in IGNORED]
        out += nxt
        level = nxt
    return out


class ManualFolder:
    """A manual download folder: its extracted folders and its top-level zip archives (opened once)."""

    def __init__(self, root: str):
        self.root = root
        self._prefixes = _local_prefixes(root)
        self._zips = [ZipFiles(os.path.join(root, f)) for f in sorted(os.listdir(root))
                      if f.lower().endswith(".zip") and os.path.isfile(os.path.join(root, f))]

    def find(self, spec: datasets.DatasetSpec) -> Found | None:
        """Where ``spec``'s image and mask folders are, or None."""
        for prefix in self._prefixes:
            im, gt = (os.path.normpath(os.path.join(self.root, prefix, d)) for d in (spec.image_dir, spec.gt_dir))
            if os.path.isdir(im) and os.path.isdir(gt):
                return Found(datasets.LOCAL, im, gt, os.path.join(self.root, prefix))
        for z in self._zips:
            for folder in z.folders_ending_with(spec.image_dir):
                prefix = folder[: len(folder) - len(spec.image_dir)]
                if z.isdir(f"{z.path}/{prefix}{spec.gt_dir}"):
                    return Found(z, f"{z.path}/{folder}", f"{z.path}/{prefix}{spec.gt_dir}", z.path)
        return None
