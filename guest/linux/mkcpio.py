#!/usr/bin/env python3
"""A tiny cpio "newc" (SVR4, magic 070701) writer for initramfs images.

Reads a list of entries in the format of the kernel's usr/gen_init_cpio, one
per line ('#' comments and blank lines are skipped):

    dir   NAME MODE UID GID
    file  NAME SOURCE MODE UID GID
    slink NAME TARGET MODE UID GID
    nod   NAME MODE UID GID {c|b} MAJ MIN

and writes an UNCOMPRESSED archive. Device nodes are written as headers only,
so no mknod (and no root) is needed on the build host. Every entry gets the
same mtime (SOURCE_DATE_EPOCH, default 0) so the output is reproducible.

Usage: mkcpio.py -o OUT.cpio LIST [LIST...]   (LIST "-" reads stdin)
"""

import argparse
import os
import stat
import sys

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


class CpioWriter:
    def __init__(self, out, mtime=0):
        self.out = out
        self.mtime = mtime
        self.ino = 1
        self.offset = 0
        self.names = set()

    def _write(self, data):
        self.out.write(data)
        self.offset += len(data)

    def _pad4(self):
        self._write(b"\0" * (-self.offset % 4))

    def entry(self, name, mode, uid=0, gid=0, data=b"", rmaj=0, rmin=0, nlink=1):
        """One archive member; NAME is stored without a leading '/'."""
        if name != TRAILER:
            name = name.lstrip("/")
            if not name or name in self.names:
                raise ValueError(f"bad or duplicate cpio entry name: {name!r}")
            self.names.add(name)
        ino = 0 if name == TRAILER else self.ino
        self.ino += 1
        namebytes = name.encode() + b"\0"
        fields = (ino, mode, uid, gid, nlink, self.mtime, len(data),
                  0, 0, rmaj, rmin, len(namebytes), 0)
        self._write(MAGIC + b"".join(b"%08X" % f for f in fields))
        self._write(namebytes)
        self._pad4()
        self._write(data)
        self._pad4()

    def dir(self, name, perm, uid=0, gid=0):
        self.entry(name, stat.S_IFDIR | perm, uid, gid, nlink=2)

    def file(self, name, source, perm, uid=0, gid=0):
        with open(source, "rb") as f:
            self.entry(name, stat.S_IFREG | perm, uid, gid, f.read())

    def slink(self, name, target, perm=0o777, uid=0, gid=0):
        self.entry(name, stat.S_IFLNK | perm, uid, gid, target.encode())

    def nod(self, name, perm, uid, gid, kind, major, minor):
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self.entry(name, fmt | perm, uid, gid, rmaj=major, rmin=minor)

    def close(self):
        self.entry(TRAILER, 0, nlink=1)
        # Pad the archive to a 512-byte multiple, as cpio(1) does.
        self._write(b"\0" * (-self.offset % 512))


def parse_line(w, line, where):
    f = line.split()
    kind, n = f[0], len(f)
    try:
        if kind == "dir" and n == 5:
            w.dir(f[1], int(f[2], 8), int(f[3]), int(f[4]))
        elif kind == "file" and n == 6:
            w.file(f[1], f[2], int(f[3], 8), int(f[4]), int(f[5]))
        elif kind == "slink" and n == 6:
            w.slink(f[1], f[2], int(f[3], 8), int(f[4]), int(f[5]))
        elif kind == "nod" and n == 8 and f[5] in ("c", "b"):
            w.nod(f[1], int(f[2], 8), int(f[3]), int(f[4]), f[5], int(f[6]), int(f[7]))
        else:
            raise ValueError(f"unknown entry or wrong field count: {line!r}")
    except (ValueError, OSError) as e:
        sys.exit(f"mkcpio: {where}: {e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("lists", nargs="+")
    args = ap.parse_args(argv)
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as out:
        w = CpioWriter(out, mtime)
        for path in args.lists:
            src = sys.stdin if path == "-" else open(path)
            with src:
                for num, raw in enumerate(src, 1):
                    line = raw.strip()
                    if line and not line.startswith("#"):
                        parse_line(w, line, f"{path}:{num}")
        w.close()
    os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
