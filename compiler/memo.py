"""Values derived from immutable objects, found again by the object's identity.

A long-running controller compiles and proves build after build, and an incremental
compile hands the switches a change did not touch on as the same frozen objects: what was
derived from one (its proof indexes, its report line, its file's digest) holds for as long
as the object lives. Hashing such an object (a switch's 3,000 entries) would cost what
deriving does, so the key is its identity, and the memo holds the object so that the
identity stays unique while it is remembered.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import operator
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

_EVERY: weakref.WeakSet[ByObject[Any, Any]] = weakref.WeakSet()


_OTHERS: list[Callable[[], None]] = []  # how to empty the memos that are not ByObject


def also_forget(clear: Callable[[], None]) -> None:
    """Have `forget` call `clear` too (a memo kept another way, e.g. by value)."""
    _OTHERS.append(clear)


def forget() -> None:
    """Empty every memo (what a new process starts without: benchmarks, tests)."""
    for memo in list(_EVERY):
        memo.clear()
    for clear in _OTHERS:
        clear()


class ByObject(Generic[K, V]):
    """`make(obj)` per object, the least recently used dropped beyond the objects of one
    build (`hold`) and `spare` more (the versions a few operations replaced: a switch's
    tables are megabytes, so a long-running controller keeps no history). Thread-safe
    (serve compiles in its worker thread while its API thread may trace); `make` runs
    outside the lock, so two threads may both derive a value the first time."""

    def __init__(self, spare: int) -> None:
        self.spare = spare
        self.keep = spare
        self._items: OrderedDict[int, tuple[K, V]] = OrderedDict()
        self._lock = threading.Lock()
        _EVERY.add(self)

    def hold(self, count: int) -> None:
        """Keep room for `count` objects in use at once (a build's switches or files)."""
        self.keep = max(self.keep, count + self.spare)

    def get(self, obj: K, make: Callable[[K], V]) -> V:
        key = id(obj)
        with self._lock:
            found = self._items.get(key)
            if found is not None and found[0] is obj:
                self._items.move_to_end(key)
                return found[1]
        value = make(obj)
        with self._lock:
            self._items[key] = (obj, value)
            while len(self._items) > self.keep:
                self._items.popitem(last=False)
        return value

    def put(self, obj: K, value: V) -> None:
        """Remember `value` as what was derived from `obj` (in place of anything before)."""
        with self._lock:
            self._items[id(obj)] = (obj, value)
            self._items.move_to_end(id(obj))
            while len(self._items) > self.keep:
                self._items.popitem(last=False)

    def find(self, obj: K) -> V | None:
        """What was derived from `obj`, if it is still remembered (None: nothing); like
        `get`, it counts as a use."""
        with self._lock:
            found = self._items.get(id(obj))
            if found is None or found[0] is not obj:
                return None
            self._items.move_to_end(id(obj))
            return found[1]

    def drop(self, obj: K) -> None:
        """Forget what was derived from `obj` (replaced by a new version)."""
        with self._lock:
            found = self._items.get(id(obj))
            if found is not None and found[0] is obj:
                del self._items[id(obj)]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


class ByFile(Generic[V]):
    """Per file name, the last value kept for it (a few files: a controller's policy and
    its grants), the oldest file dropped beyond `most`. Thread-safe; emptied by `forget`."""

    def __init__(self, most: int = 4) -> None:
        self.most = most
        self._files: dict[str, V] = {}
        self._lock = threading.Lock()
        also_forget(self.clear)

    def get(self, file: str) -> V | None:
        with self._lock:
            return self._files.get(file)

    def keep(self, file: str, value: V) -> None:
        with self._lock:
            self._files.pop(file, None)
            self._files[file] = value
            while len(self._files) > self.most:
                del self._files[next(iter(self._files))]

    def clear(self) -> None:
        with self._lock:
            self._files.clear()


def differing_places(before: Sequence[object], after: Sequence[object]) -> list[int]:
    """The places where two sequences of the same length hold different objects (by
    identity), found without a Python-level loop: an edit of a 10,000-rule policy asks
    this of every rule, compile after compile."""
    return list(itertools.compress(range(len(after)), map(operator.is_not, before, after)))


def shared_ends(before: Sequence[object], after: Sequence[object]) -> tuple[int, int]:
    """(head, tail): `before` and `after` hold the same objects in their first `head` and
    their last `tail` places, `head + tail` at most the shorter length; found without a
    Python-level loop (a ToR compiled again keeps its identity entries, most of its
    `policy` entries and its routes in place)."""
    most = min(len(before), len(after))
    head = next(itertools.compress(itertools.count(), map(operator.is_not, before, after)), most)
    tail = next(
        itertools.compress(
            itertools.count(), map(operator.is_not, reversed(before), reversed(after))
        ),
        most,
    )
    return head, min(tail, most - head)


class ByPlace(Generic[K, V]):
    """`make(item)` for each item of a sequence that changes a little from one call to the
    next under the same name (a switch's entries, build after build): the values of the
    items the last sequence of that name shared at both ends (`shared_ends`) are taken from
    it, only the middle is made. The last sequence of each name is held (at most `names`
    names; then all are dropped). Thread-safe as ByObject is."""

    def __init__(self, names: int) -> None:
        self.names = names
        self._last: dict[object, tuple[Sequence[object], list[V]]] = {}
        self._lock = threading.Lock()
        also_forget(self._clear)

    def _clear(self) -> None:
        with self._lock:
            self._last.clear()

    def values(self, name: object, items: Sequence[K], make: Callable[[K], V]) -> list[V]:
        with self._lock:
            last = self._last.get(name)
        if last is None:
            out = list(map(make, items))
        else:
            before, values = last
            head, tail = shared_ends(before, items)
            out = values[:head]
            out += map(make, items[head : len(items) - tail])
            out += values[len(before) - tail :] if tail else ()
        with self._lock:
            if len(self._last) >= self.names and name not in self._last:
                self._last.clear()
            self._last[name] = (items, out)
        return out


@contextlib.contextmanager
def collection_paused(freeze: bool = False, splice: bool | None = None) -> Iterator[None]:
    """No cyclic garbage collection inside: for the passes that build many small objects
    which live as long as the pass (a check's AST and atom masks, a proof's indexes).
    Every full collection would walk them and the rest of the heap (a 10k-rule build is
    millions of objects) to find nothing: a fifth of a 10k-rule check, and half of a
    differential proof on that floor. Reference counting still frees what they drop.

    When the pass made many objects, what it still holds when it ends joins the oldest
    generation at once (gc.freeze then gc.unfreeze: list splices), as a collection would
    promote it, but without the young collection that would walk it all first (0.4 s after
    a 10k-rule build): it is examined at the next full collection, and any cycle among it
    that has become garbage by then is collected there. A small pass (a quarantine's) is
    left to the young collection, which frees its cycles (asyncio's) soonest.

    `splice`: True splices whatever the pass made (a long-running controller's proof of
    one ToR ahead, compiler/verify.py `prove_tor_ahead`: what it keeps would otherwise
    reach the oldest generation through young collections, which count it towards the next
    full collection, a second's pause at 48 ToRs); False never.

    `freeze`: what is still alive when the pass ends is set apart from every later
    collection (gc.freeze) — a one-shot verb's memos, which nothing frees before the
    process ends: a full collection would walk them all (1.2 s after a 10k-rule compile)
    to find nothing."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            many = gc.get_count()[0] > _SPLICED if splice is None else splice
            if freeze:
                gc.freeze()
            elif many and not gc.get_freeze_count():
                gc.freeze()  # (unfreeze would also free what a one-shot verb froze)
                gc.unfreeze()
            gc.enable()


_SPLICED = 100_000  # objects a pass made: beyond, they are spliced into the oldest generation
