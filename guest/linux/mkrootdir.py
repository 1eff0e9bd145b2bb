#!/usr/bin/env python3
"""Lay out a root file system tree from an initramfs list, for `mke2fs -d DIR`.

Reads the gen_init_cpio-style lists mkcpio.py reads (dir, file, slink, nod;
'#' comments and blank lines skipped) and creates DIR with the directories,
files (copied) and symlinks. Device nodes are skipped, so no mknod and no root
are needed: with a disk root the kernel mounts devtmpfs on /dev itself
(CONFIG_DEVTMPFS_MOUNT), and /dev/console for init's first descriptors comes
from the kernel's built-in initramfs before the disk is mounted.

Usage: mkrootdir.py DIR LIST [LIST...]   (DIR must not exist)
"""

import os
import shutil
import sys


def build(root, lines):
    for number, line in enumerate(lines, 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        kind, name = words[0], words[1].lstrip("/")
        path = os.path.join(root, name)
        if kind == "dir":
            os.makedirs(path, exist_ok=True)
            os.chmod(path, int(words[2], 8))
        elif kind == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copyfile(words[2], path)
            os.chmod(path, int(words[3], 8))
        elif kind == "slink":
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.symlink(words[2], path)
        elif kind == "nod":
            continue
        else:
            sys.exit(f"mkrootdir.py: line {number}: unknown entry {kind!r}")


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    root = argv[1]
    os.makedirs(root)
    for name in argv[2:]:
        with open(name) as f:
            build(root, f.read().splitlines())


if __name__ == "__main__":
    main(sys.argv)
