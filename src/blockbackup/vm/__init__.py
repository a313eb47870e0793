"""Pull backups of disks that a running QEMU owns (``blockbackup vm ...``).

Layered like the repository: :mod:`.names` and :mod:`.checkpoints` are pure logic (what is
ours, whether an incremental is safe), :mod:`.qemu` is the one door to QEMU's monitor,
:mod:`.fleece` builds and removes the point-in-time views inside QEMU, :mod:`.pull` reads
them over NBD into the repository. The commands are in ``cli/vm*.py``.
"""
