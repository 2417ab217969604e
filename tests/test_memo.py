"""compiler/memo.py: values per object, by identity, bounded by one build and a few spare."""

from __future__ import annotations

from compiler.memo import ByObject, forget


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
