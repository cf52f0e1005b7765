"""Listing the files of a data folder: links to folders followed, each real folder entered once.

`os.walk(followlinks=True)`, which torchvision's ImageFolder uses, never ends under a
symlink loop (`a/loop -> ..`): it lists the same files again at every level, in a list that
grows until memory runs out. One link to a folder already listed makes it count those files
twice. Here each folder is known by its (device, inode): a link into a folder already walked
is skipped and named, so a loop ends and every file is counted once, while links to folders
elsewhere (a class folder kept on another disk) are followed as before.
"""
from __future__ import annotations

import os
from typing import Callable


class FolderWalk:
    """The files under some folders; `skipped` lists the links left out, and `check` is called
    for every entry, so that a stop signal can end a long walk."""

    def __init__(self, check: Callable[[], None] = lambda: None) -> None:
        self.check = check
        self.seen: set[tuple[int, int]] = set()
        self.skipped: list[str] = []

    def files(self, tops: list[str]) -> list[list[str]]:
        """Every file under each of `tops` (or a link to one, or a broken link: what os.walk
        lists as files), in torchvision's order: folder by folder in sorted paths, names sorted.

        The real folders under every top are walked before any link is followed, so that a
        link into another top (a class folder linked into a second class) is the one skipped."""
        listing: list[list[tuple[str, list[str]]]] = [[] for _ in tops]
        stack = [(top, i) for i, top in enumerate(tops) if self._enter(top)]
        links: list[tuple[str, int]] = []  # links to folders, with the top they were found under
        while stack or links:
            if not stack:
                link, i = links.pop(0)
                stack += [(link, i)] if self._enter(link) else []
                continue
            folder, i = stack.pop()
            listing[i].append((folder, self._list(folder, i, stack, links)))
        return [[os.path.join(folder, name) for folder, names in sorted(found) for name in sorted(names)]
                for found in listing]

    def _list(self, folder: str, i: int, stack: list, links: list) -> list[str]:
        """The file names in `folder`; its real subfolders go on `stack`, its links to folders on `links`."""
        names = []
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            return names  # an unreadable folder: os.walk passes over it too
        for entry in entries:
            self.check()
            if _is_dir(entry, follow=False):
                stack += [(entry.path, i)] if self._enter(entry.path) else []
            elif entry.is_symlink() and _is_dir(entry, follow=True):
                links.append((entry.path, i))
            else:
                names.append(entry.name)
        return names

    def _enter(self, path: str) -> bool:
        """Whether `path` leads to a folder not walked yet and not around it (and mark it walked)."""
        try:
            stat = os.stat(path)
        except OSError:
            return False
        key = (stat.st_dev, stat.st_ino)
        if key in self.seen or _leads_up(path):
            self.skipped.append(path)
            return False
        self.seen.add(key)
        return True


def _leads_up(path: str) -> bool:
    """Whether `path` is a link to a folder holding the link itself (`loop -> ..`, `up -> /`):
    everything it leads to is walked already or lies outside the folders asked for."""
    if not os.path.islink(path):
        return False
    target, here = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
    return os.path.commonpath([target, here]) == target


def _is_dir(entry: os.DirEntry, follow: bool) -> bool:
    try:
        return entry.is_dir(follow_symlinks=follow)
    except OSError:
        return False
