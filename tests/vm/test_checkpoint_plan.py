"""Full or incremental: every reason a checkpoint cannot be trusted gives a full backup."""

from __future__ import annotations

from blockbackup.vm.checkpoints import FULL, INCREMENTAL, Previous, plan, stale_checkpoints
from blockbackup.vm.qemu import Bitmap, Disk

CP = "bb-20261204T190000-0123abcd"
G = 65536


def disk(**changes: object) -> Disk:
    d = Disk("drive0", "drive0", "qcow2", "/img/d0.qcow2", 1 << 30)
    d.bitmaps = [Bitmap(CP, recording=True, persistent=True, busy=False, granularity=G, count=0)]
    for key, value in changes.items():
        setattr(d, key, value)
    return d


def previous(**source: object) -> Previous:
    return Previous(
        "20261204T190000.000000Z-aa",
        1 << 30,
        {"checkpoint": CP, "image": "/img/d0.qcow2", **source},
    )


def test_a_recorded_healthy_checkpoint_gives_an_incremental() -> None:
    p = plan(disk(), previous(), full=False, granularity=G)
    assert (p.mode, p.checkpoint, p.base, p.reason) == (
        INCREMENTAL,
        CP,
        "20261204T190000.000000Z-aa",
        None,
    )


def test_each_doubt_gives_a_full_backup_with_its_reason() -> None:
    def bitmap(**kw: object) -> list[Bitmap]:
        b = Bitmap(CP, recording=True, persistent=True, busy=False, granularity=G, count=0)
        for key, value in kw.items():
            setattr(b, key, value)
        return [b]

    cases = [
        (disk(), None, "no earlier backup"),
        (disk(format="raw"), previous(), "cannot keep a checkpoint"),
        (disk(), previous(checkpoint=None), "records no checkpoint"),
        (disk(), previous(checkpoint="users-bitmap"), "records no checkpoint"),
        (disk(size=2 << 30), previous(), "resized"),
        (disk(image="/img/other.qcow2"), previous(), "another image"),
        (disk(bitmaps=[]), previous(), "is gone"),
        (disk(bitmaps=bitmap(inconsistent=True)), previous(), "inconsistent"),
        (disk(bitmaps=bitmap(recording=False)), previous(), "stopped recording"),
        (disk(bitmaps=bitmap(busy=True)), previous(), "in use"),
        (disk(bitmaps=bitmap(granularity=4096)), previous(), "not one this blockbackup made"),
        (disk(bitmaps=bitmap(persistent=False)), previous(), "not one this blockbackup made"),
    ]
    for d, prev, reason in cases:
        p = plan(d, prev, full=False, granularity=G)
        assert p.mode == FULL
        assert p.checkpoint is None
        assert p.reason is not None
        assert reason in p.reason, (reason, p.reason)
    assert plan(disk(), previous(), full=True, granularity=G).mode == FULL


def test_the_policy_removes_only_our_other_checkpoints() -> None:
    d = disk()
    d.bitmaps += [
        Bitmap("bb-20261204T180000-ffffffff", True, True, False, G, 0),
        Bitmap("nightly", True, True, False, G, 0),
        Bitmap("bb-mine", True, True, False, G, 0),
    ]
    assert stale_checkpoints(d, CP) == ["bb-20261204T180000-ffffffff"]
