"""Files of a directory or a zip read in place, by '/'-separated path below a root prefix: the one
file access of both tree layouts (tinyimagenet.py, imagefolder.py), and their `Reader`.

A zip is opened once per `TreeReader` and read member by member, never extracted. Listings are
sorted and leave out hidden files and directories (a leading dot), so a directory and its zip give
the same items in the same order. `check_source_path` is the first check of any SRC: a directory or
a readable zip, else a UserError. Imports errors and base.py only.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterable

from fastalex.errors import UserError
from fastalex.sources.base import SourceRef


def check_source_path(path: str | os.PathLike) -> str:
    """`path` as a string, once it is known to be a directory or a readable zip."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if not os.path.isdir(path):
        zip_names(path)
    return path


def zip_names(path: str) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a directory or a readable zip ({e})") from None


class TreeReader:
    """The files of a directory or zip, by '/'-separated path relative to the root: the Reader of
    the tree layouts, and what they list their items with."""

    def __init__(self, ref: SourceRef):
        self.ref = ref
        self._zip = zipfile.ZipFile(ref.path) if ref.is_zip else None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def unit(self, rel: str) -> str:
        """Each file is read on its own."""
        return rel

    def prefetch(self, items: Iterable[str]) -> None:
        """Nothing to do: each file is read when asked for (a zip member from the open zip)."""

    def read(self, rel: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(self.ref.root + rel)
        with open(os.path.join(self.ref.path, self.ref.root, rel), "rb") as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        if self._zip is not None:
            try:
                self._zip.getinfo(self.ref.root + rel)
                return True
            except KeyError:
                return False
        return os.path.isfile(os.path.join(self.ref.path, self.ref.root, rel))

    def size(self, rel: str) -> int:
        """Bytes of file `rel` (uncompressed, in a zip), read from the directory entry."""
        if self._zip is not None:
            return self._zip.getinfo(self.ref.root + rel).file_size
        return os.path.getsize(os.path.join(self.ref.path, self.ref.root, rel))

    def has_dir(self, rel: str) -> bool:
        """Whether directory `rel` exists (in a zip: whether any member lies below it)."""
        if self._zip is not None:
            prefix = self.ref.root + rel.rstrip("/") + "/"
            return any(n.startswith(prefix) for n in self._zip.namelist())
        return os.path.isdir(os.path.join(self.ref.path, self.ref.root, rel))

    def walk_files(self, rel: str) -> list[str]:
        """Paths relative to `rel` of every file below directory `rel`, at any depth, sorted;
        hidden files and directories left out. The same list for a directory and its zip."""
        if self._zip is not None:
            prefix = self.ref.root + rel.rstrip("/") + "/"
            found = (n[len(prefix) :] for n in self._zip.namelist() if n.startswith(prefix))
            return sorted(
                n
                for n in found
                if n and not n.endswith("/") and not any(p.startswith(".") for p in n.split("/"))
            )
        top = os.path.join(self.ref.path, self.ref.root, rel)
        found, seen = [], set()
        for folder, dirs, files in os.walk(top, followlinks=True):  # as torchvision's ImageFolder
            real = os.path.realpath(folder)
            if real in seen:  # a symlink loop: each directory once
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            below = os.path.relpath(folder, top).replace(os.sep, "/")
            below = "" if below == "." else below + "/"
            found += [
                below + f
                for f in files
                if not f.startswith(".") and os.path.isfile(os.path.join(folder, f))
            ]
        return sorted(found)

    def list_dir(self, rel: str) -> list[str]:
        """Names of the files directly inside directory `rel`, sorted; hidden files left out."""
        if self._zip is not None:
            prefix = self.ref.root + rel.rstrip("/") + "/"
            names = (n[len(prefix) :] for n in self._zip.namelist() if n.startswith(prefix))
            return sorted(n for n in names if n and "/" not in n and not n.startswith("."))
        full = os.path.join(self.ref.path, self.ref.root, rel)
        if not os.path.isdir(full):
            return []
        return sorted(
            e.name for e in os.scandir(full) if e.is_file() and not e.name.startswith(".")
        )
