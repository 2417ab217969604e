"""compiler/memo.py: values per object, by identity, bounded by one build and a few spare."""

from __future__ import annotations

import random

from compiler.memo import ByObject, ByPlace, forget, shared_ends


def test_values_are_per_object_not_per_equal_value_and_the_oldest_go_first() -> None:
    made: list[tuple[int, ...]] = []

    def make(obj: tuple[int, ...]) -> int:
        made.append(obj)
        return len(made)

    memo: ByObject[tuple[int, ...], int] = ByObject(spare=1)
    memo.hold(2)  # a "build" of two objects, one spare: three kept
    a, b, c, d = (tuple([i, i]) for i in range(4))
    twin = tuple([0, 0])  # equal to `a`, another object
    assert twin == a and twin is not a
    assert [memo.get(x, make) for x in (a, b, c)] == [1, 2, 3]
    assert memo.get(a, make) == 1  # remembered; now the most recent
    assert memo.get(twin, make) == 4  # equal is not the same object: derived afresh
    assert memo.get(b, make) == 5  # b was the least recently used of four: dropped
    assert memo.get(d, make) == 6
    assert memo.get(a, make) == 7  # dropped for d: three kept at most
    forget()  # every memo, as a new process
    assert memo.get(d, make) == 8


def test_put_replaces_and_find_counts_as_a_use() -> None:
    memo: ByObject[object, str] = ByObject(0)
    memo.hold(2)
    a, b, c = object(), object(), object()
    memo.put(a, "first")
    memo.put(a, "second")  # replaced, not kept
    assert memo.find(a) == "second"
    memo.put(b, "b")
    assert memo.find(a) == "second"  # a is now the most recently used
    memo.put(c, "c")  # beyond two: the least recently used (b) goes
    assert memo.find(b) is None
    assert (memo.find(a), memo.find(c)) == ("second", "c")
    assert memo.find(object()) is None


def test_shared_ends_are_by_object_and_never_overlap() -> None:
    a, b, c = [1000], [1001], [1002]
    assert shared_ends([a, b, c], [a, b, c]) == (3, 0)
    assert shared_ends([a, b, c], [a, [1001], c]) == (1, 1)
    assert shared_ends([a, a], [a]) == (1, 0)  # the tail never counts a place twice
    assert shared_ends([], [a]) == (0, 0)


def test_values_by_place_are_what_making_each_item_gives() -> None:
    """Random edits of a sequence of objects (inserts, deletes, replacements, some equal
    objects at both ends): the values made by difference are those made item by item, and
    only the middle is made again."""
    rng = random.Random(3)
    memo: ByPlace[list[int], int] = ByPlace(names=2)
    made: list[int] = []

    def make(item: list[int]) -> int:
        made.append(item[0])
        return item[0] * 7

    items = [[i] for i in range(40)]
    memo.values("tor1", items, make)
    made_again = seen = 0
    for _ in range(300):
        items = list(items)
        for _ in range(rng.randrange(1, 4)):
            where = rng.randrange(len(items) + 1)
            kind = rng.choice(("insert", "delete", "replace"))
            if kind == "insert" or not items:
                items.insert(where, [rng.randrange(1000)])
            elif kind == "delete":
                del items[min(where, len(items) - 1)]
            else:
                items[min(where, len(items) - 1)] = [rng.randrange(1000)]
        made.clear()
        assert memo.values("tor1", items, make) == [item[0] * 7 for item in items]
        made_again, seen = made_again + len(made), seen + len(items)
    assert made_again < seen / 3, (made_again, seen)
    memo.values("tor2", items, make)
    memo.values("tor3", items, make)  # a third name: the names held are dropped
    made.clear()
    memo.values("tor1", items, make)
    assert len(made) == len(items)
