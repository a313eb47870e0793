"""A booted guest writes numbered blocks to its disk while ``vm backup`` runs (TCG).

The kernel is Debian's ``linux-image-amd64``; the initramfs is built here: busybox-static,
the virtio modules (decompressed if the kernel ships them compressed) and an ``/init``
that writes block ``i % N`` with sequence number ``i``, each write synced before the
next. A point-in-time image then has one M such that every block holds the newest
sequence number <= M of its residue: the restored disk must have that shape.
"""

from __future__ import annotations

import glob
import lzma
import os
import re
import shutil
import stat
import time
from pathlib import Path

import pytest

from testkit.qemuvm import MiB, Vm, make_disk, run_bb, vm_backup

BLOCKS = 64
BLOCK = 4096
KERNELS = sorted(glob.glob("/boot/vmlinuz-*"))
BUSYBOX = shutil.which("busybox")
NEEDED = ("virtio_blk", "virtio_pci")

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m.ko; done
while [ ! -b /dev/vda ]; do sleep 0.1; done
echo GUEST-WRITING > /dev/ttyS0
i=0
while true; do
  b=$((i % {BLOCKS}))
  printf "BLK %d SEQ %d END\\n" $b $i > /tmp/blk
  dd if=/tmp/blk of=/dev/vda bs={BLOCK} seek=$b count=1 conv=sync,notrunc,fsync 2>/dev/null
  if [ $((i % 16)) = 0 ]; then echo "SEQ $i" > /dev/ttyS0; fi
  i=$((i + 1))
done
"""

pytestmark = [
    pytest.mark.skipif(
        not KERNELS or BUSYBOX is None, reason="needs linux-image-amd64 and busybox-static"
    ),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86"),
    pytest.mark.timeout(600),
]


def _cpio_newc(files: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, content) entries (the kernel's initramfs format)."""
    out = bytearray()

    def entry(name: str, mode: int, data: bytes, ino: int) -> None:
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name.encode() + b"\0")
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    for ino, (name, mode, data) in enumerate(files, start=1):
        entry(name, mode, data, ino)
    entry("TRAILER!!!", 0, b"", 0)
    return bytes(out)


def _module_bytes(path: str) -> bytes:
    data = Path(path).read_bytes()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 * MiB)
    return data


def build_initramfs(kernel: str, out: Path) -> None:
    version = kernel.removeprefix("/boot/vmlinuz-")
    moddir = Path("/lib/modules") / version
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()

    def short(path: str) -> str:
        return re.sub(r"\.ko(\.xz|\.zst|\.gz)?$", "", os.path.basename(path))

    by_name = {short(m): m for m in deps}
    order: list[str] = []

    def add(mod: str) -> None:
        for dep in deps[mod]:
            add(dep)
        if mod not in order:
            order.append(mod)

    for name in NEEDED:
        if name not in by_name:
            pytest.skip(f"{name} is built into {version} or missing")
        add(by_name[name])
    d, f = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o755
    files = [("bin", d, b""), ("modules", d, b""), ("init", f, INIT.encode())]
    assert BUSYBOX is not None
    files.append(("bin/busybox", f, Path(BUSYBOX).read_bytes()))
    files += [(f"modules/{short(m)}.ko", f, _module_bytes(str(moddir / m))) for m in order]
    files.append(("modules/order", f, " ".join(short(m) for m in order).encode()))
    out.write_bytes(_cpio_newc(files))


def blocks_of(image: bytes) -> dict[int, int]:
    """block -> sequence number, for the blocks the guest wrote."""
    out = {}
    for b in range(BLOCKS):
        head = image[b * BLOCK : b * BLOCK + 64]
        if head.strip(b"\0") == b"":
            continue
        m = re.match(rb"BLK (\d+) SEQ (\d+) END\n", head)
        assert m is not None, f"block {b} is torn: {head!r}"
        assert int(m.group(1)) == b
        out[b] = int(m.group(2))
    return out


def assert_one_point_in_time(seqs: dict[int, int]) -> int:
    """The M that explains every block (see the module docstring)."""
    top = max(seqs.values())
    for b in range(BLOCKS):
        expected = top - ((top - b) % BLOCKS)
        if expected < 0:
            assert b not in seqs
        else:
            assert seqs.get(b) == expected, f"block {b}: {seqs.get(b)}, expected {expected}"
    return top


def test_a_booted_guest_writing_during_the_backup_is_restored_at_one_point(tmp_path: Path) -> None:
    kernel = KERNELS[-1]
    if not os.access(kernel, os.R_OK):
        pytest.skip(f"{kernel} is not readable")
    initrd = tmp_path / "initrd.img"
    build_initramfs(kernel, initrd)
    console = tmp_path / "console.log"
    disk = make_disk(tmp_path, "drive0", "vd0", 16 * MiB)
    extra = [
        "-m",
        "256",
        "-kernel",
        kernel,
        "-initrd",
        str(initrd),
        "-no-reboot",
        "-append",
        "console=ttyS0 quiet panic=-1",
        "-serial",
        f"file:{console}",
    ]
    repo = str(tmp_path / "repo")
    assert run_bb("repo", "init", repo, "--no-encryption").returncode == 0
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    vm = Vm(tmp_path, [disk], extra).start()
    try:
        deadline = time.monotonic() + 240

        def seq_seen() -> int:
            text = console.read_text(errors="replace") if console.exists() else ""
            found = re.findall(r"SEQ (\d+)", text)
            return int(found[-1]) if found else -1

        while seq_seen() < 2 * BLOCKS:
            assert vm.proc is not None
            assert vm.proc.poll() is None, "QEMU exited"
            assert time.monotonic() < deadline, (
                f"the guest did not write: {console.read_text()[-2000:]}"
            )
            time.sleep(0.5)
        results = []
        for _ in range(2):  # a full backup, then an incremental, both while the guest writes
            before = seq_seen()
            result, _ = vm_backup(vm.qmp, repo, scratch)
            results.append((result, before))
            assert vm.ours_left() == []
            time.sleep(1)
        after = seq_seen()
        vm.cmd("stop")
    finally:
        vm.quit()
    assert [r["disks"][0]["mode"] for r, _ in results] == ["full", "incremental"]
    kernel_log = console.read_text(errors="replace")
    assert "I/O error" not in kernel_log  # the guest never saw the backup
    points = []
    for result, before in results:
        out = tmp_path / "restored.img"
        restored = run_bb(
            "vm", "restore", "--repo", repo, result["snapshot"], "--disk", "drive0", str(out)
        )
        assert restored.returncode == 0, restored.stderr
        top = assert_one_point_in_time(blocks_of(out.read_bytes()))
        out.unlink()
        assert top >= before  # the guest's writes up to the backup's start are in it
        points.append(top)
    assert points[0] < points[1] < after + 16
