"""IPv4 address sets as sorted, disjoint, inclusive integer intervals.

Services are unions of addresses and prefixes; every set operation the checker needs
(union, membership, the elementary intervals that partition many sets) is done on
intervals, which stay small where prefix lists would explode.
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

MAX_ADDRESS = (1 << 32) - 1
# ASCII digits, bounded: str.isdigit() accepts other scripts' digits and int() refuses
# numerals past 4300 digits.
_OCTET = re.compile(r"[0-9]{1,3}")
_PREFIX_LEN = re.compile(r"[0-9]{1,2}")
Interval = tuple[int, int]


class AddressSyntaxError(ValueError):
    """An address or prefix literal that is not valid IPv4 (message says why)."""


def parse_ipv4(text: str) -> int:
    parts = text.split(".")
    if len(parts) != 4 or not all(_OCTET.fullmatch(p) for p in parts):
        raise AddressSyntaxError(f"{_quote(text)} is not an IPv4 address")
    value = 0
    for part in parts:
        octet = int(part)
        if octet > 255:
            raise AddressSyntaxError(f"octet {octet} of {_quote(text)} is out of range 0-255")
        if len(part) > 1 and part[0] == "0":
            raise AddressSyntaxError(f"octet '{part}' of '{text}' has a leading zero")
        value = (value << 8) | octet
    return value


def _quote(text: str) -> str:
    return repr(text if len(text) <= 24 else text[:24] + "...")


@functools.lru_cache(maxsize=1 << 16)  # builds print the same hosts on every switch
def format_ipv4(value: int) -> str:
    return ".".join(str((value >> shift) & 0xFF) for shift in (24, 16, 8, 0))


def parse_prefix(text: str) -> Interval:
    """'10.0.1.0/24' or '10.0.1.7' -> inclusive interval; host bits set is an error."""
    addr_text, slash, length_text = text.partition("/")
    addr = parse_ipv4(addr_text)
    if not slash:
        return (addr, addr)
    if not _PREFIX_LEN.fullmatch(length_text) or int(length_text) > 32:
        raise AddressSyntaxError(f"prefix length '/{length_text}' is out of range 0-32")
    length = int(length_text)
    size = 1 << (32 - length)
    if addr & (size - 1):
        network = format_ipv4(addr & ~(size - 1) & MAX_ADDRESS)
        raise AddressSyntaxError(f"'{text}' has host bits set (the network is {network}/{length})")
    return (addr, addr + size - 1)


def merge_intervals(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sort and coalesce overlapping or adjacent intervals."""
    if type(intervals) is tuple:  # already sorted and apart (what sets hold): as it is
        last = -2
        for lo, hi in intervals:
            if lo <= last + 1 or hi < lo:
                break
            last = hi
        else:
            return intervals
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


@dataclass(frozen=True, slots=True)
class AddressSet:
    intervals: tuple[Interval, ...]

    @classmethod
    def of(cls, intervals: Iterable[Interval]) -> AddressSet:
        return cls(merge_intervals(intervals))

    @classmethod
    def everything(cls) -> AddressSet:
        return cls(((0, MAX_ADDRESS),))

    def union(self, other: AddressSet) -> AddressSet:
        return AddressSet.of(self.intervals + other.intervals)

    def intersection(self, other: AddressSet) -> AddressSet:
        out: list[Interval] = []
        i = j = 0
        a, b = self.intervals, other.intervals
        while i < len(a) and j < len(b):
            lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
            if lo <= hi:
                out.append((lo, hi))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return AddressSet(tuple(out))

    def meets(self, other: AddressSet) -> bool:
        """Whether the two sets share an address (`intersection` without building it)."""
        i = j = 0
        a, b = self.intervals, other.intervals
        while i < len(a) and j < len(b):
            if max(a[i][0], b[j][0]) <= min(a[i][1], b[j][1]):
                return True
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return False

    def difference(self, other: AddressSet) -> AddressSet:
        out: list[Interval] = []
        for lo, hi in self.intervals:
            for olo, ohi in other.intervals:
                if ohi < lo or olo > hi:
                    continue
                if olo > lo:
                    out.append((lo, olo - 1))
                lo = ohi + 1
                if lo > hi:
                    break
            if lo <= hi:
                out.append((lo, hi))
        return AddressSet(tuple(out))

    def __contains__(self, address: int) -> bool:
        i = bisect.bisect_right(self.intervals, (address, MAX_ADDRESS)) - 1
        return i >= 0 and self.intervals[i][0] <= address <= self.intervals[i][1]

    def __bool__(self) -> bool:
        return bool(self.intervals)

    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.intervals)

    def __str__(self) -> str:
        return ", ".join(_interval_text(lo, hi) for lo, hi in self.intervals)


def _interval_text(lo: int, hi: int) -> str:
    if lo == hi:
        return format_ipv4(lo)
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        return f"{format_ipv4(lo)}/{32 - size.bit_length() + 1}"
    return f"{format_ipv4(lo)}-{format_ipv4(hi)}"
