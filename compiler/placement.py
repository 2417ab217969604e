"""Which ToRs host the addresses of a set, per inventory (compiler/memo.py keeps one
placement per inventory object): the incremental compile asks it of every rule's sides to
know which ToRs a rule touches, and so does every proof record. A long-running controller
asks it of the same 2,000 sets operation after operation; each is worked out once."""

from __future__ import annotations

import bisect
import threading

from compiler.addresses import Interval
from compiler.inventory import Inventory
from compiler.memo import ByObject

_MAX_SETS = 100_000  # address sets per inventory whose ToRs are remembered


class Placement:
    """The hosts of one inventory by address, and the ToRs of each set asked about."""

    def __init__(self, inventory: Inventory) -> None:
        self.hosts = sorted((h.ip, h.switch) for h in inventory.hosts)
        self.ips = [ip for ip, _ in self.hosts]
        self.tors = frozenset(sw for _, sw in self.hosts)
        self._found: dict[tuple[Interval, ...], frozenset[str]] = {}
        self._lock = threading.Lock()

    def tors_of(self, intervals: tuple[Interval, ...]) -> frozenset[str]:
        """The ToRs hosting an address of `intervals` (an AddressSet's)."""
        with self._lock:
            found = self._found.get(intervals)
        if found is not None:
            return found
        out: set[str] = set()
        for lo, hi in intervals:
            for k in range(bisect.bisect_left(self.ips, lo), bisect.bisect_right(self.ips, hi)):
                out.add(self.hosts[k][1])
            if len(out) == len(self.tors):
                break
        found = frozenset(out)
        with self._lock:
            if len(self._found) >= _MAX_SETS:
                self._found.clear()
            self._found[intervals] = found
        return found


_PLACEMENTS: ByObject[Inventory, Placement] = ByObject(2)


def placement(inventory: Inventory) -> Placement:
    return _PLACEMENTS.get(inventory, Placement)
