"""Which format an image file is in, from its first bytes, as QEMU's probes tell it.

Why ``serve`` probes: a qcow2 file exported as raw shows its header and tables to the
client, which can overwrite them and destroy the image. So ``serve`` serves what it can
read (qcow2's virtual disk, or raw), and a file that carries another known image header is
exported as raw only when the user says ``--format raw``. The magics are those QEMU's
format probes look for (block/<format>.c ``*_probe``); matching QEMU means a file that
qemu-img would call a vmdk is never taken for a raw disk here.
"""

from __future__ import annotations

import os
import struct

__all__ = ["HEADER_BYTES", "SERVABLE", "probe", "qcow2_other_files", "read_header"]

#: Formats ``serve`` can serve as their virtual disk.
SERVABLE = ("raw", "qcow2")
#: Bytes read for probing (as QEMU; every magic below lies in the first 512) and for the
#: names a qcow2 header points at (qemu-img puts them in the first 4 KiB).
HEADER_BYTES = 4096

_QCOW_MAGIC = b"QFI\xfb"
#: qcow2 incompatible feature bit: the guest data lives in another file.
_QCOW2_EXTERNAL_DATA_FILE = 1 << 2
_VDI_SIGNATURE = struct.pack("<I", 0xBEDA107F)  # at offset 0x40
_CLOOP_MAGIC = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)
#: (format, magic) found at offset 0.
_MAGICS_AT_START = (
    ("qed", b"QED\0"),
    ("vmdk", b"KDMV"),  # VMDK4 sparse extent
    ("vmdk", b"COWD"),  # VMDK3
    ("vmdk", b"# Disk DescriptorFile"),
    ("vhdx", b"vhdxfile"),
    ("vpc", b"conectix"),
    ("luks", b"LUKS\xba\xbe"),
    ("parallels", b"WithoutFreeSpace"),
    ("parallels", b"WithouFreSpacExt"),
    ("bochs", b"Bochs Virtual HD Image"),
    ("cloop", _CLOOP_MAGIC),
)


def probe(header: bytes) -> str | None:
    """The image format whose header ``header`` starts with; None: no known header (raw)."""
    if header.startswith(_QCOW_MAGIC) and len(header) >= 8:
        (version,) = struct.unpack_from(">I", header, 4)
        return "qcow" if version == 1 else "qcow2"
    for fmt, magic in _MAGICS_AT_START:
        if header.startswith(magic):
            return fmt
    if header[0x40:0x44] == _VDI_SIGNATURE:
        return "vdi"
    return None


def qcow2_other_files(header: bytes) -> list[str]:
    """What files other than itself a qcow2 header makes its reader open: its backing
    file and an external data file, described for a message (empty: none).

    Why ``serve`` asks: a client of a *raw* image can write any header into it. If that
    header were probed as qcow2 at the next start and named ``/etc/shadow`` as its
    backing file, the client would read the host's files. QEMU guards a probed raw
    image's first sector instead; ``serve`` opens other files only when the user named
    the format."""
    found: list[str] = []
    if len(header) < 20:
        return found  # too short to be opened at all: the daemon says why
    backing_offset, backing_size = struct.unpack_from(">QI", header, 8)
    if backing_offset:
        name = header[backing_offset : backing_offset + backing_size]
        shown = name.decode(errors="replace") if len(name) == backing_size else "..."
        found.append(f"backing file {shown!r}")
    (version,) = struct.unpack_from(">I", header, 4)
    if version >= 3 and len(header) >= 80:
        (incompatible,) = struct.unpack_from(">Q", header, 72)
        if incompatible & _QCOW2_EXTERNAL_DATA_FILE:
            found.append("an external data file")
    return found


def read_header(path: str, *, writable: bool) -> bytes:
    """The first bytes of ``path``, opened as the daemon will open it (read-write unless
    read-only), so that a missing file or a missing permission is found here; raises
    OSError."""
    fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        return os.pread(fd, HEADER_BYTES, 0)
    finally:
        os.close(fd)
