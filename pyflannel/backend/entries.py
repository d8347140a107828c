"""The kernel entries a backend owns: what the kernel identifies them by, the one index of them that answers
every kernel event, and the batch that writes them.

Every backend (and the daemon, for its blackhole route) keeps what it programmed in an OwnedEntries. A kernel
notification is then matched with one dict lookup: an entry we own that was deleted or changed calls for a
repair; an announcement equal to what we wrote is our own write and does not.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Generic, TypeVar

from ..netlink import (
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTN_BLACKHOLE,
    Fdb,
    KernelEvent,
    Neigh,
    Netlink,
    NetlinkError,
    Op,
    Route,
    is_missing,
)
from .base import BackendError

log = logging.getLogger(__name__)

Entry = Route | Neigh | Fdb
EntryKey = tuple[object, ...]
G = TypeVar("G", bound=Hashable)


def kernel_key(o: Entry) -> EntryKey:
    """What the kernel identifies the entry by: a replace with the same key overwrites it."""
    if isinstance(o, Route):
        return ("r", o.dst, o.table, o.priority)
    if isinstance(o, Neigh):
        return ("n", o.ifindex, o.dst)
    return ("f", o.ifindex, o.lladdr)


class OwnedEntries(Generic[G]):
    """The entries we programmed, grouped by what they serve (a peer's subnet), indexed by kernel key."""

    def __init__(self) -> None:
        self._groups: dict[G, list[Entry]] = {}
        self._by_key: dict[EntryKey, Entry] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def __contains__(self, group: object) -> bool:
        return group in self._groups

    def get(self, group: G) -> list[Entry] | None:
        return self._groups.get(group)

    def items(self) -> Iterator[tuple[G, list[Entry]]]:
        return iter(self._groups.items())

    def entries(self) -> Iterator[Entry]:
        return iter(self._by_key.values())

    def reset(self, groups: Mapping[G, Sequence[Entry]] | None = None) -> None:
        """Forget everything; then own exactly `groups` (what a reconcile pass made the kernel hold)."""
        self._groups = {g: list(es) for g, es in (groups or {}).items()}
        self._by_key = {kernel_key(o): o for es in self._groups.values() for o in es}

    def set(self, group: G, entries: Iterable[Entry]) -> list[Entry]:
        """Own `entries` for `group` instead of what it had; returns what it had ([] if nothing)."""
        old = self.pop(group) or []
        new = list(entries)
        if new:
            self._groups[group] = new
            for o in new:
                self._by_key[kernel_key(o)] = o
        return old

    def program(self, group: G, new: Sequence[Entry]) -> list[Op]:
        """Own `new` for `group`; returns the ops that make the kernel agree: deletes of what the group had under
        keys `new` does not reuse, then a replace of each new entry (a replace overwrites an entry of its key in
        place, so a changed peer is never without a route)."""
        keys = {kernel_key(o) for o in new}
        old = self.set(group, new)
        return [Op.delete(o) for o in old if kernel_key(o) not in keys] + [Op.replace(o) for o in new]

    def pop(self, group: G) -> list[Entry] | None:
        old = self._groups.pop(group, None)
        for o in old or ():
            self._by_key.pop(kernel_key(o), None)
        return old

    def lookup(self, obj: Entry) -> Entry | None:
        return self._by_key.get(kernel_key(obj))

    def verdict(self, ev: KernelEvent) -> bool | None:
        """For an event on a route, neighbour or FDB entry: True when the kernel lost or changed an entry we
        own, False when the event leaves ours intact (typically our own write announced back), None when the
        event is not about an entry we own (the caller decides whether a pass would sweep it)."""
        obj = ev.obj
        if not isinstance(obj, Route | Neigh | Fdb):
            return None
        have = self._by_key.get(kernel_key(obj))
        if have is None:
            return None
        if isinstance(obj, Fdb) and isinstance(have, Fdb) and obj.dst != have.dst:
            # A MAC may have several destinations: deleting another one leaves ours, adding one may replace it.
            return ev.action == "new"
        if ev.action == "del":
            return True
        if isinstance(obj, Neigh | Fdb) and not obj.state & NUD_PERMANENT:
            return True
        return have != obj


def describe(o: Entry, names: Mapping[int, str]) -> str:
    """The entry as `ip route` / `ip neigh` / `bridge fdb` would print it, with exactly the fields that make two
    entries equal (so comparing lines compares entries)."""

    def dev(index: int | None) -> str:
        return names.get(index, f"if{index}") if index is not None else "-"

    if isinstance(o, Route):
        head = "blackhole " if o.type == RTN_BLACKHOLE else ""
        parts = [f"{head}{o.dst}"]
        if o.gateway is not None:
            parts.append(f"via {o.gateway}")
        if o.oif is not None:
            parts.append(f"dev {dev(o.oif)}")
        if o.onlink:
            parts.append("onlink")
        if o.table != RT_TABLE_MAIN:
            parts.append(f"table {o.table}")
        if o.priority:
            parts.append(f"metric {o.priority}")
        return "route " + " ".join(parts)
    if isinstance(o, Neigh):
        return f"neigh {o.dst} lladdr {o.lladdr} dev {dev(o.ifindex)}"
    return f"fdb {o.lladdr} dst {o.dst} dev {dev(o.ifindex)}"


async def device_names(nl: Netlink) -> dict[int, str]:
    return {link.index: link.name for link in await nl.links()}


async def apply_ops(nl: Netlink, what: str, ops: Sequence[Op]) -> None:
    """One batch to the kernel; a BackendError naming `what` if any op failed (deletes of absent entries are
    fine: the entry is gone either way)."""
    if not ops:
        return
    exc = errors_to_exception(what, ops, await nl.apply(ops))
    if exc is not None:
        raise exc


def errors_to_exception(what: str, ops: Sequence[Op], errs: Sequence[NetlinkError | None]) -> BackendError | None:
    """Log every failed op and summarise them in one BackendError."""
    bad = [
        (op, e)
        for op, e in zip(ops, errs, strict=True)
        if e is not None and not (op.action == "delete" and is_missing(e))
    ]
    for _op, e in bad[:20]:
        log.error("%s: %s", what, e)
    if not bad:
        return None
    return BackendError(f"{what}: {len(bad)} of {len(ops)} kernel requests failed; first: {bad[0][1]}")


__all__ = [
    "Entry",
    "EntryKey",
    "OwnedEntries",
    "apply_ops",
    "describe",
    "device_names",
    "errors_to_exception",
    "kernel_key",
]
