"""Who may do what to a node: QEMU's permission model, at the level blockbackup needs.

Why: an image must have one writer of its metadata. QEMU keeps that promise across
processes (QEMU, qemu-img, qemu-io, qemu-storage-daemon) by turning each node's
permissions into lock bytes on the image file; blockbackup takes the same permissions and
the same locks so that every one of these tools respects the others.

The model, as in QEMU's ``block.c``:

- every use of a node takes some permissions (:class:`Perm`: consistent read, write,
  write unchanged, resize) and *shares* some with other users of the node (everything it
  does not mind others doing);
- a node's users are its parent nodes, each through a child link whose
  :class:`ChildRole` says what the parent does with the child, and its non-node users
  (exports, jobs), which state their :class:`Use` directly;
- what a parent takes on its child follows from its role and from what the parent's own
  users take (:func:`child_use`): a filter passes its users' needs through; a format that
  owns metadata (qcow2) writes and resizes its file whenever it is writable and never
  shares write or resize of it, because a second writer of its metadata would corrupt it;
- a node's use is the union of what its users take and the intersection of what they
  share (:func:`node_use`); :func:`refresh` hands it to the node's driver, which may
  refuse it (the ``file`` driver: another process's lock bytes) -- all or nothing.

Permissions are not checked per request (the request layer already refuses writes to a
read-only node); they exist so that other users, in this process or others, are refused.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from blockbackup.errors import BlockBackupError

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode


class Perm(enum.IntFlag):
    """QEMU's BLK_PERM_* bits (their values are the lock byte offsets' low part)."""

    NONE = 0
    CONSISTENT_READ = 0x01
    WRITE = 0x02
    WRITE_UNCHANGED = 0x04
    RESIZE = 0x08


#: Every permission (QEMU 7.2's BLK_PERM_ALL: graph-mod is gone since 7.0).
ALL = Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE
#: What a filter passes through to its child (QEMU's DEFAULT_PERM_PASSTHROUGH: all of it).
PASSTHROUGH = ALL

#: The names QEMU's error messages use (``bdrv_perm_names``).
_NAMES = {
    Perm.CONSISTENT_READ: "consistent read",
    Perm.WRITE: "write",
    Perm.WRITE_UNCHANGED: "write unchanged",
    Perm.RESIZE: "resize",
}
#: The names of QAPI's BlockPermission enum (blkdebug's take/unshare-child-perms).
QAPI_NAMES = {
    "consistent-read": Perm.CONSISTENT_READ,
    "write": Perm.WRITE,
    "write-unchanged": Perm.WRITE_UNCHANGED,
    "resize": Perm.RESIZE,
}


def perm_bits(perm: Perm) -> Iterator[Perm]:
    """The single bits of ``perm``, lowest first (QEMU's PERM_FOREACH order)."""
    for bit in (Perm.CONSISTENT_READ, Perm.WRITE, Perm.WRITE_UNCHANGED, Perm.RESIZE):
        if perm & bit:
            yield bit


def qapi_names(perm: Perm) -> list[str]:
    """``perm`` as QAPI BlockPermission names, highest bit first (as QEMU lists them)."""
    return [name for name, bit in reversed(QAPI_NAMES.items()) if perm & bit]


def perm_name(perm: Perm) -> str:
    """``"write"``, or ``"write, resize"`` for several bits, as QEMU names them."""
    return ", ".join(_NAMES[bit] for bit in perm_bits(perm))


class ChildRole(enum.Flag):
    """What a parent does with a child (QEMU's BdrvChildRole, the parts that matter).

    Exactly one of ``FILTERED``, ``COW``, ``DATA``/``METADATA`` or one of the two
    copy-before-write roles describes a link; ``PRIMARY`` marks the main child.
    """

    NONE = 0
    #: The parent shows the child's data unchanged (raw, throttle, blkdebug).
    FILTERED = enum.auto()
    #: The child is a backing file: only read, for data the parent does not hold.
    COW = enum.auto()
    #: The parent stores guest data in the child.
    DATA = enum.auto()
    #: The parent stores its own metadata in the child (qcow2's file): one writer only.
    METADATA = enum.auto()
    PRIMARY = enum.auto()
    #: A copy-before-write filter's source: while the filter is in use, nobody else may
    #: change it, or writes would bypass the copy (QEMU's ``cbw_child_perm``).
    SNAPSHOT_SOURCE = enum.auto()
    #: A copy-before-write filter's target: written by the copy, never resized.
    SNAPSHOT_TARGET = enum.auto()
    #: The parent uses the child's own API, not its data (snapshot-access): takes nothing.
    VIEW = enum.auto()


@dataclass(frozen=True, slots=True)
class Use:
    """What one user takes (``perm``) and what it lets others do (``shared``)."""

    perm: Perm = Perm.NONE
    shared: Perm = ALL

    def __or__(self, other: Use) -> Use:
        """Two users at once: both take theirs; only what both share is shared."""
        return Use(self.perm | other.perm, self.shared & other.shared)


#: A user that takes nothing and shares everything (a block job's hold on its target).
NO_USE = Use()


@dataclass(frozen=True, slots=True)
class Link:
    """How a parent uses one child: its role, plus what blkdebug's options add."""

    role: ChildRole
    #: Taken in addition to what the role implies (blkdebug ``take-child-perms``).
    take: Perm = Perm.NONE
    #: Not shared, whatever the role implies (blkdebug ``unshare-child-perms``).
    unshare: Perm = Perm.NONE


@runtime_checkable
class PermissionUser(Protocol):
    """A non-node user that takes permissions (an export). Others take :data:`NO_USE`."""

    @property
    def use(self) -> Use: ...


def _filtered(parent: Use) -> Use:
    return Use(parent.perm & PASSTHROUGH, parent.shared & PASSTHROUGH)


def _cow(parent: Use) -> Use:
    # A backing file is read, never written; others may change it only if the parent
    # can live with changing data.
    shared = Perm.WRITE | Perm.RESIZE if parent.shared & Perm.WRITE else Perm.NONE
    return Use(
        parent.perm & Perm.CONSISTENT_READ,
        shared | Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
    )


def _storage(role: ChildRole, parent: Use, writable: bool) -> Use:
    perm, shared = parent.perm & PASSTHROUGH, parent.shared & PASSTHROUGH
    if role & ChildRole.METADATA:
        # The format writes its metadata even if nobody writes through it, and two
        # writers of metadata corrupt the image: nobody else writes or resizes the file.
        if writable:
            perm |= Perm.WRITE | Perm.RESIZE
        perm |= Perm.CONSISTENT_READ
        shared &= ~(Perm.WRITE | Perm.RESIZE)
    if role & ChildRole.DATA:
        shared &= ~Perm.RESIZE  # the format knows the size of its data
        if role & ChildRole.METADATA:
            # It may have to write what it would otherwise leave unchanged (allocation),
            # and it grows its file as it allocates.
            if perm & Perm.WRITE_UNCHANGED:
                perm |= Perm.WRITE
            if perm & Perm.WRITE:
                perm |= Perm.RESIZE
        # A format that only stores data (raw with offset/size) writes and resizes only
        # for its users, as QEMU's raw_child_perm trims it.
    return Use(perm, shared)


def child_use(link: Link, parent: Use, *, writable: bool, in_use: bool) -> Use:
    """What a parent whose users add up to ``parent`` takes on a child linked by ``link``.

    ``writable``: the parent is not read-only. ``in_use``: the parent has users.
    """
    role = link.role
    if role & ChildRole.FILTERED:
        use = _filtered(parent)
    elif role & ChildRole.COW:
        use = _cow(parent)
    elif role & (ChildRole.DATA | ChildRole.METADATA):
        use = _storage(role, parent, writable)
    elif role & ChildRole.SNAPSHOT_SOURCE:
        use = _filtered(parent)
        if in_use:
            use = Use(use.perm, use.shared & ~(Perm.WRITE | Perm.RESIZE))
    elif role & ChildRole.SNAPSHOT_TARGET:
        use = Use(Perm.WRITE, ALL & ~Perm.RESIZE)
    elif role & ChildRole.VIEW:
        use = NO_USE
    else:  # pragma: no cover - every link states its role
        raise ValueError(f"child role {role!r} describes no use")
    return Use(use.perm | link.take, use.shared & ~link.unshare)


class _Pass:
    """One computation of every use: the memo, and the user being added, if any.

    A user being added is first checked as sharing everything, then as it is: QEMU
    attaches an export's block device sharing all and only then unshares resize, so
    its conflicts are found (and named) in that order.
    """

    def __init__(self, entering: object | None = None) -> None:
        self.memo: dict[BlockNode, Use] = {}
        self.entering = entering


def user_use(user: object, state: _Pass | None = None) -> Use:
    """What a non-node user (export, job) takes on the node it uses."""
    use = user.use if isinstance(user, PermissionUser) else NO_USE
    if state is not None and user is state.entering:
        use = Use(use.perm, ALL)
    return use


def node_use(node: BlockNode, state: _Pass | None = None) -> Use:
    """Everything taken on ``node`` by its parents and users, and what all of them share."""
    state = state or _Pass()
    found = state.memo.get(node)
    if found is not None:
        return found
    use = NO_USE
    for _, _, one in holders(node, state):
        use = use | one
    state.memo[node] = use
    return use


def link_use(parent: BlockNode, role: str, state: _Pass | None = None) -> Use:
    """What ``parent`` takes on its child ``role`` now (an edge of the block graph).

    A child with ``force-share`` (read-only by construction) shares everything with its
    parents, as QEMU's ``bdrv_child_perm`` makes it.
    """
    child = parent.children[role]
    link = parent.child_links.get(role, Link(ChildRole.FILTERED | ChildRole.PRIMARY))
    in_use = bool(parent.parents or parent.users)
    parent_use = node_use(parent, state)
    use = child_use(link, parent_use, writable=not parent.read_only, in_use=in_use)
    return Use(use.perm, ALL) if child.config.force_share else use


def holders(node: BlockNode, state: _Pass | None = None) -> list[tuple[str, str, Use]]:
    """Who uses ``node`` and how: (who, as which child, use), newest first as QEMU lists
    a node's parents (users, which come last, before the parent nodes)."""
    state = state or _Pass()
    out = [
        ("an unnamed block device", "root", user_use(user, state))
        for user in reversed(list(node.users))
    ]
    out += [
        (f"node '{parent.name}'", role, link_use(parent, role, state))
        for parent in reversed(node.parents)
        for role, child in parent.children.items()
        if child is node
    ]
    return out


def _check_conflicts(node: BlockNode, state: _Pass) -> None:
    """Refuse two users of one node where one takes what the other does not share
    (QEMU's ``bdrv_parent_perms_conflict``, with its text): within one process there is
    only one open file, so the file locks cannot see this conflict."""
    found = holders(node, state)
    for i, (a_who, a_role, a) in enumerate(found):  # the one that does not share
        for j, (b_who, b_role, b) in enumerate(found):  # the one that takes
            clash = b.perm & ~a.shared
            if i != j and clash:
                raise BlockBackupError(
                    f"Permission conflict on node '{node.name}': permissions "
                    f"'{perm_name(clash)}' are both required by {b_who} (uses node "
                    f"'{node.name}' as '{b_role}' child) and unshared by {a_who} (uses "
                    f"node '{node.name}' as '{a_role}' child)."
                )


def _below(roots: Iterable[BlockNode]) -> list[BlockNode]:
    """``roots`` and every node under them, each once, parents before children."""
    order: list[BlockNode] = []
    seen: set[BlockNode] = set()

    def visit(node: BlockNode) -> None:
        if node in seen:
            return
        seen.add(node)
        for child in node.children.values():
            visit(child)
        order.append(node)

    for root in roots:
        visit(root)
    order.reverse()
    return order


def refresh(*roots: BlockNode, entering: object | None = None) -> None:
    """Give ``roots`` and every node under them the use their parents and users make now.

    All or nothing: node by node, parents first, the users of each are checked against
    each other and its driver is asked (``check_perm``, which may take new locks); on a
    refusal, the drivers asked before go back (``abort_perm``) and QEMU's error
    (:class:`~blockbackup.errors.BlockBackupError`) propagates; else each settles
    (``set_perm``, which drops what is no longer needed). ``entering``: a user just
    added (see :class:`_Pass`); if its second step fails, the first stays applied
    until the caller, removing the user, refreshes again. Nodes still being opened
    (no driver yet) are skipped: nobody uses them yet.
    """
    steps = [_Pass(entering), _Pass()] if entering is not None else [_Pass()]
    for state in steps:
        plan = [(n, node_use(n, state)) for n in _below(roots) if n.is_open]
        asked: list[BlockNode] = []
        try:
            for node, use in plan:
                _check_conflicts(node, state)
                node.driver.check_perm(use.perm, use.shared)
                asked.append(node)
        except BaseException:
            for node in asked:
                node.driver.abort_perm()
            raise
        for node, use in plan:
            node.driver.set_perm(use.perm, use.shared)
