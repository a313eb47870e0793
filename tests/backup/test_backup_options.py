"""The backup's enum options: checked once where they enter, one default each.

``sync``, ``bitmap-mode``, ``on-source-error``/``on-target-error`` and ``on-cbw-error`` are
Python enums; :class:`~blockbackup.jobs.backup.BackupOptions` turns what a library caller
passes into members (or refuses it with QEMU's text, the same the QMP schema gives), and
the QMP schema is derived from the same enums and defaults, so the two cannot drift.
"""

from __future__ import annotations

import pytest

from blockbackup.block.filters.copy_before_write import ON_CBW_ERROR_DEFAULT, OnCbwError
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.backup import BackupOptions, BitmapSyncMode, SyncMode
from blockbackup.jobs.status import BlockdevOnError
from blockbackup.qmp.commands.backup import BLOCKDEV_BACKUP, backup_options


def test_library_strings_become_members_once() -> None:
    opts = BackupOptions(
        "src",
        "tgt",
        "incremental",  # type: ignore[arg-type]
        bitmap_mode="on-success",  # type: ignore[arg-type]
        on_target_error="stop",  # type: ignore[arg-type]
        on_cbw_error="break-snapshot",  # type: ignore[arg-type]
    )
    assert opts.sync is SyncMode.INCREMENTAL
    assert opts.bitmap_mode is BitmapSyncMode.ON_SUCCESS
    assert opts.on_source_error is BlockdevOnError.REPORT
    assert opts.on_target_error is BlockdevOnError.STOP
    assert opts.on_cbw_error is OnCbwError.BREAK_SNAPSHOT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sync": "fast"}, "Parameter 'sync' does not accept value 'fast'"),
        ({"bitmap_mode": "sometimes"}, "Parameter 'bitmap-mode' does not accept value 'sometimes'"),
        ({"on_source_error": "panic"}, "Parameter 'on-source-error' does not accept value 'panic'"),
        ({"on_cbw_error": "x"}, "Parameter 'on-cbw-error' does not accept value 'x'"),
        # QEMU's order: sync is checked before the others
        ({"sync": "fast", "on_cbw_error": "x"}, "Parameter 'sync' does not accept value 'fast'"),
    ],
)
def test_bad_values_are_refused_when_the_options_are_made(
    kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"device": "src", "target": "tgt", "sync": "full", **kwargs}
    with pytest.raises(BlockBackupError) as info:
        BackupOptions(**args)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_qmp_schema_and_library_share_values_and_defaults() -> None:
    from_qmp = backup_options(
        BLOCKDEV_BACKUP.check({"device": "src", "target": "tgt", "sync": "full"}, "")
    )
    assert from_qmp == BackupOptions("src", "tgt", SyncMode.FULL)
    assert from_qmp.on_cbw_error is ON_CBW_ERROR_DEFAULT
    members = {m.name: m for m in BLOCKDEV_BACKUP.members}
    for name, enum in (
        ("sync", SyncMode),
        ("bitmap-mode", BitmapSyncMode),
        ("on-source-error", BlockdevOnError),
        ("on-cbw-error", OnCbwError),
    ):
        assert members[name].type.values == tuple(m.value for m in enum)  # type: ignore[attr-defined]
