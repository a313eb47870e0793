"""``blkdebug``: fault injection in front of any node, so every failure path is testable.

Every failure scenario of the project (EIO on a backup target, ENOSPC on the third write,
a flush that fails once) is driven by this filter instead of by patching code. It takes
QEMU's ``blkdebug`` options, so scenarios written for qemu-storage-daemon run unchanged,
and it has a small run-time API for Python tests (:meth:`BlkdebugDriver.add_rule`,
:meth:`BlkdebugDriver.add_breakpoint`, :attr:`BlkdebugDriver.counts`).

How QEMU's rules map onto ours
------------------------------
In QEMU an ``inject-error`` rule is *activated* by a debug event (raised by the generic
block layer or by a format driver sitting above the blkdebug node) and, once active, fails
every later request whose I/O type is in the rule's ``iotype`` mask (default: all but
block-status) until another event with rules replaces the active set. Nothing in
blockbackup raises debug events, so here each event names the operations it fails,
directly and deterministically:

=====================================  ===============================================
event                                  fails
=====================================  ===============================================
``read_aio`` (``preadv``\\*)           read
``write_aio``, ``pwritev``             write (data writes only, *not* write-zeroes)
``pwritev_zero``                       write-zeroes
``flush_to_disk``, ``flush_to_os``     flush
``pdiscard``\\*                        discard
``none``                               every type in ``iotype`` (default: all but
                                       block-status), as QEMU's rule active from open
any other QEMU event (qcow2 metadata)  nothing: accepted, so configs parse, never fires
=====================================  ===============================================

(\\* ``preadv`` and ``pdiscard`` are blockbackup extensions; QEMU has no such events.)

Why ``write_aio`` does not fail write-zeroes: in QEMU a write-zeroes request never raises
``write_aio`` (the raw format raises it only in its data-write path) nor ``pwritev``
(``bdrv_aligned_pwritev`` raises ``pwritev_zero`` *instead of* ``pwritev`` for zero
writes). A write-zeroes-only workload therefore never trips a ``write_aio`` rule in QEMU
either; only QEMU's "stays active after the first data write" stickiness would, and that
is deliberately not modelled (it makes a rule's reach depend on request history).

When ``iotype`` is given on a data event it replaces the event's operations (QEMU's
"activate on this event, fail that I/O type" is approximated as "fail that I/O type").
``sector`` pins a rule as QEMU does: the rule fires when byte ``sector * 512`` lies
inside the request. ``state`` and ``set-state`` are honoured minimally: the state starts
at 1, a ``set-state`` rule whose event matches a request switches it, and an
``inject-error`` rule with a non-zero ``state`` fires only in that state.
"""

from __future__ import annotations

import asyncio
import enum
import errno as errno_mod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from blockbackup.block.driver import Extent, Limits, WriteFlags, io_error, register
from blockbackup.block.filters.forwarding import FilterDriver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.block.permissions import QAPI_NAMES, ChildRole, Link, Perm
from blockbackup.errors import BlockBackupError

SECTOR_SIZE = 512
_INT_MAX = 2**31 - 1


class IOType(enum.StrEnum):
    """The operations a rule can fail; values are QEMU's ``BlkdebugIOType`` names."""

    READ = "read"
    WRITE = "write"
    WRITE_ZEROES = "write-zeroes"
    DISCARD = "discard"
    FLUSH = "flush"
    BLOCK_STATUS = "block-status"

    @classmethod
    def parse(cls, value: IOType | str) -> IOType:
        """``IOType``, its value, or the Python spelling (``write_zeroes``)."""
        if isinstance(value, IOType):
            return value
        try:
            return cls(value.replace("_", "-"))
        except ValueError:
            raise ValueError(f"unknown I/O type {value!r}") from None


#: QEMU's default ``iotype`` mask: every type but block-status.
DEFAULT_IOTYPES: frozenset[IOType] = frozenset(IOType) - {IOType.BLOCK_STATUS}

#: QEMU's ``BlkdebugEvent`` enum (QAPI ``block-core.json``), in QEMU's order.
QEMU_EVENTS: tuple[str, ...] = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero",
    "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
    "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
)  # fmt: skip

#: Events that fail requests (see the module docstring); the others never fire.
EVENT_IOTYPES: dict[str, frozenset[IOType]] = {
    "read_aio": frozenset({IOType.READ}),
    "preadv": frozenset({IOType.READ}),
    "write_aio": frozenset({IOType.WRITE}),
    "pwritev": frozenset({IOType.WRITE}),
    "pwritev_zero": frozenset({IOType.WRITE_ZEROES}),
    "flush_to_disk": frozenset({IOType.FLUSH}),
    "flush_to_os": frozenset({IOType.FLUSH}),
    "pdiscard": frozenset({IOType.DISCARD}),
    "none": DEFAULT_IOTYPES,
}

EVENTS: tuple[str, ...] = (*QEMU_EVENTS, "preadv", "pdiscard")


def _overlaps(start: int | None, length: int | None, offset: int, nbytes: int) -> bool:
    """Whether a pin ``[start, start+length)`` meets the request ``[offset, offset+nbytes)``.

    ``start is None`` matches every request; a pinned range never matches a flush
    (``nbytes == 0``), as in QEMU.
    """
    if start is None:
        return True
    end = start + (length if length is not None else 1)
    return nbytes > 0 and start < offset + nbytes and offset < end


@dataclass(eq=False)
class Rule:
    """One error-injection rule. Identity matters: remove it with the object you got."""

    ops: frozenset[IOType]
    errno: int = errno_mod.EIO
    offset: int | None = None
    length: int | None = None
    once: bool = False
    #: Only fire in this blkdebug state (0: any state), as QEMU's ``state``.
    state: int = 0
    #: The QEMU event this rule came from, when parsed from options.
    event: str | None = None
    immediately: bool = False
    #: How many requests this rule has failed.
    hits: int = 0

    def matches(self, op: IOType, offset: int, nbytes: int, state: int) -> bool:
        if op not in self.ops or (self.state and self.state != state):
            return False
        return _overlaps(self.offset, self.length, offset, nbytes)


@dataclass(eq=False)
class SetStateRule:
    """QEMU's ``set-state``: on ``event`` in ``state`` (0: any), switch to ``new_state``."""

    ops: frozenset[IOType]
    state: int
    new_state: int
    event: str


@dataclass(eq=False)
class Breakpoint:
    """Holds matching requests before they reach the child, until :meth:`resume`.

    ``arrived`` is set as soon as a request is held, so a test can wait for "a write is
    in flight" without sleeping. A breakpoint holds every matching request until it is
    resumed or removed; requests arriving after ``resume`` pass.
    """

    ops: frozenset[IOType]
    offset: int | None = None
    length: int | None = None
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    _resumed: asyncio.Event = field(default_factory=asyncio.Event)

    def resume(self) -> None:
        """Let the held requests (and every later one) through."""
        self._resumed.set()

    @property
    def resumed(self) -> bool:
        return self._resumed.is_set()

    async def _hold(self) -> None:
        self.held += 1
        self.arrived.set()
        try:
            await self._resumed.wait()
        finally:
            self.held -= 1


def _ops_of(op: IOType | str | Iterable[IOType | str]) -> frozenset[IOType]:
    if isinstance(op, str):
        return frozenset({IOType.parse(op)})
    return frozenset(IOType.parse(o) for o in op)


@register
class BlkdebugDriver(FilterDriver):
    """A filter that forwards everything to its ``image`` child, failing what rules say.

    The checked operations are overridden; the rest (truncate, cache hints) is forwarded
    unchecked by :class:`FilterDriver`, which also keeps inline requests and copy offload
    from passing by the rules (QEMU's blkdebug has no fast path around its checks).
    """

    driver_name: ClassVar[str] = "blkdebug"
    filtered_role: ClassVar[str] = "image"

    def __init__(self, node: BlockNode, child: BlockNode, limits: Limits) -> None:
        super().__init__(node, child, limits)
        self.rules: list[Rule] = []
        self.set_state_rules: list[SetStateRule] = []
        self.breakpoints: list[Breakpoint] = []
        self.state = 1
        #: Requests seen per operation (as the driver gets them: aligned and split).
        self.counts: dict[IOType, int] = dict.fromkeys(IOType, 0)

    # -- options -----------------------------------------------------------------------------

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> BlkdebugDriver:
        if opts.str("config", None) is not None:
            raise BlockBackupError(
                "blkdebug: 'config' files are not supported; give the rules as 'inject-error'"
            )
        rules = [_parse_inject_error(opts, i, v) for i, v in enumerate(opts.list("inject-error"))]
        set_state = [_parse_set_state(opts, i, v) for i, v in enumerate(opts.list("set-state"))]
        child_perms = {}
        for key in ("take-child-perms", "unshare-child-perms"):
            child_perms[key] = Perm.NONE
            for i, perm in enumerate(opts.list(key)):
                if perm not in QAPI_NAMES:
                    raise BlockBackupError(f"Parameter '{key}[{i}]' does not accept value '{perm}'")
                child_perms[key] |= QAPI_NAMES[perm]
        align = opts.int("align", 0)
        max_transfer = opts.int("max-transfer", 0)
        sizes = {
            k: opts.int(k, 0)
            for k in ("opt-write-zero", "max-write-zero", "opt-discard", "max-discard")
        }

        child = await opts.child("image")
        link = Link(
            ChildRole.FILTERED | ChildRole.PRIMARY,
            take=child_perms["take-child-perms"],
            unshare=child_perms["unshare-child-perms"],
        )
        node.add_child("image", child, link)

        if align < 0 or align >= _INT_MAX or (align and align & (align - 1)):
            raise BlockBackupError(f"Cannot meet constraints with align {align}")
        align = max(align, child.limits.request_alignment, 1)
        for key, value in (("max-transfer", max_transfer), *sizes.items()):
            if value < 0 or value >= _INT_MAX or value % align:
                raise BlockBackupError(f"Cannot meet constraints with {key} {value}")
        child_max = child.limits.max_transfer
        if max_transfer == 0 or (child_max and child_max < max_transfer):
            max_transfer = child_max
        limits = Limits(align, max_transfer, child.limits.cluster_size)
        driver = cls(node, child, limits)
        driver.set_state_rules.extend(ss for ss in set_state if ss.event != "none")
        # QEMU raises the event "none" once, at open: its set-state rules apply now, and
        # its inject-error rules are active from then on if their state matched.
        for ss in set_state:
            if ss.event == "none" and ss.state in (0, 1):
                driver.state = ss.new_state
        for rule in rules:
            if rule.event == "none":
                if rule.state not in (0, 1):
                    continue
                rule.state = 0
            driver.rules.append(rule)
        return driver

    # -- run-time API ------------------------------------------------------------------------

    def add_rule(
        self,
        op: IOType | str | Iterable[IOType | str],
        errno: int = errno_mod.EIO,
        *,
        offset: int | None = None,
        length: int | None = None,
        once: bool = False,
    ) -> Rule:
        """Fail requests of ``op`` (one or several types) with ``errno``.

        With ``offset``, only requests overlapping ``[offset, offset+length)`` fail (length
        defaults to 1 byte); ``once`` removes the rule after it first fires.
        """
        if offset is None and length is not None:
            raise ValueError("length needs an offset")
        if length is not None and length <= 0:
            raise ValueError("length must be positive")
        rule = Rule(_ops_of(op), errno, offset, length, once)
        self.rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        """Remove ``rule``; removing a rule that already went (``once``) is fine."""
        if rule in self.rules:
            self.rules.remove(rule)

    def clear_rules(self) -> None:
        self.rules.clear()

    def add_breakpoint(
        self,
        op: IOType | str | Iterable[IOType | str],
        *,
        offset: int | None = None,
        length: int | None = None,
    ) -> Breakpoint:
        """Hold requests of ``op`` (overlapping the range, if given) until resumed."""
        bp = Breakpoint(_ops_of(op), offset, length)
        self.breakpoints.append(bp)
        return bp

    def remove_breakpoint(self, bp: Breakpoint) -> None:
        """Remove ``bp`` and let whatever it holds through."""
        if bp in self.breakpoints:
            self.breakpoints.remove(bp)
        bp.resume()

    # -- the check in front of every request -------------------------------------------------

    async def _check(self, op: IOType, offset: int, nbytes: int) -> None:
        self.counts[op] += 1
        for bp in tuple(self.breakpoints):
            if op in bp.ops and not bp.resumed and _overlaps(bp.offset, bp.length, offset, nbytes):
                await bp._hold()
        state = self.state
        for ss in self.set_state_rules:
            if op in ss.ops and (not ss.state or ss.state == state):
                self.state = ss.new_state
        for rule in self.rules:
            if rule.matches(op, offset, nbytes, state):
                rule.hits += 1
                if rule.once:
                    self.rules.remove(rule)
                raise io_error(rule.errno, f"injected by blkdebug node {self.node.name}")

    # -- data path: a filter over ``image`` --------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        await self._check(IOType.READ, offset, length)
        return await self.child.read(offset, length)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        await self._check(IOType.WRITE, offset, len(data))
        await self.child.write(offset, data, flags)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        await self._check(IOType.WRITE_ZEROES, offset, length)
        await self.child.write_zeroes(offset, length, flags)

    async def discard(self, offset: int, length: int) -> None:
        await self._check(IOType.DISCARD, offset, length)
        await self.child.discard(offset, length)

    async def flush(self) -> None:
        await self._check(IOType.FLUSH, 0, 0)
        await self.child.flush()

    async def block_status(self, offset: int, length: int) -> Extent:
        await self._check(IOType.BLOCK_STATUS, offset, length)
        extent = await self.child.block_status(offset, length)
        return Extent(offset, extent.length, extent.status)


def _item(opts: Options, key: str, index: int, value: Any) -> Options:
    return Options(opts.graph, value, f"{opts.prefix}{key}[{index}].")


def _event(item: Options) -> str:
    event: str = item.str("event")
    if event not in EVENTS:
        raise BlockBackupError(f"Parameter 'event' does not accept value '{event}'")
    return event


def _parse_inject_error(opts: Options, index: int, value: Any) -> Rule:
    item = _item(opts, "inject-error", index, value)
    event = _event(item)
    state = item.int("state", 0)
    iotypes = _parse_iotype(item)
    code = item.int("errno", errno_mod.EIO)
    sector = item.int("sector", -1)
    once = item.bool("once", False)
    immediately = item.bool("immediately", False)
    item.finish()
    ops = EVENT_IOTYPES.get(event, frozenset())
    if iotypes is not None and event in EVENT_IOTYPES:
        ops = iotypes
    offset = None if sector == -1 else sector * SECTOR_SIZE
    return Rule(ops, code, offset, None, once, state, event, immediately)


def _parse_iotype(item: Options) -> frozenset[IOType] | None:
    value = item.raw("iotype", None)
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    out: set[IOType] = set()
    for v in values:
        if not isinstance(v, str):
            raise BlockBackupError(
                f"Invalid parameter type for '{item.prefix}iotype', expected: string"
            )
        try:
            out.add(IOType(v))
        except ValueError:
            raise BlockBackupError(f"Parameter 'iotype' does not accept value '{v}'") from None
    return frozenset(out)


def _parse_set_state(opts: Options, index: int, value: Any) -> SetStateRule:
    item = _item(opts, "set-state", index, value)
    event = _event(item)
    state = item.int("state", 0)
    new_state = item.int("new_state")
    item.finish()
    return SetStateRule(EVENT_IOTYPES.get(event, frozenset()), state, new_state, event)
