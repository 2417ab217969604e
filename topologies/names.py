"""Mininet node names for inventory names.

Mininet names a node's interfaces `<node>-eth<port>`, Linux refuses interface names longer
than 15 characters, and the Mininet CLI only recognises a node name made of letters, digits
and `_`. An inventory name may be longer and may contain `-`
(`hdb-replica-primary-01`), so a floor gives Mininet its own short names:

    >>> node_names(["tor1", "hdb-replica-primary-01"])["tor1"]
    'tor1'
    >>> len(node_names(["hdb-replica-primary-01"])["hdb-replica-primary-01"]) <= NODE_NAME_MAX
    True

A name that is already safe keeps itself (the example floors look as they always did);
every other gets a stem of its letters and digits and a hash of the whole name, salted
again until it is unique. Everything a user reads — the matrix, alerts, the CLI — keeps
the inventory names; only interfaces and Mininet's own listings show the short ones.
"""

from __future__ import annotations

import hashlib
import keyword
import re
from collections.abc import Iterable

from compiler.inventory import MAX_DATA_PORT

IFNAMSIZ = 15  # Linux: interface names are at most 15 bytes (16 with the NUL)
NODE_NAME_MAX = IFNAMSIZ - len(f"-eth{MAX_DATA_PORT}")  # 8: room for the longest port
STEM = 4  # letters and digits of the inventory name kept in front of the hash
_SAFE = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,{NODE_NAME_MAX - 1}}}")
# Variables of the CLI's `py` (the Mininet object, the inventory's nodes): never a node name.
RESERVED = frozenset({"net", "node"})


def is_safe(name: str) -> bool:
    """Whether Mininet can use `name` as is: short enough for `-eth<port>`, a Python
    identifier (the CLI's `py`), and made of the characters the CLI reads as a node name."""
    return bool(_SAFE.fullmatch(name)) and not keyword.iskeyword(name) and name not in RESERVED


def _derived(name: str, salt: int) -> str:
    stem = re.sub(r"[^a-z0-9]", "", name.lower())
    if not stem[:1].isalpha():
        stem = "n" + stem
    digest = hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()
    return stem[:STEM] + digest[: NODE_NAME_MAX - min(len(stem), STEM)]


def node_names(names: Iterable[str]) -> dict[str, str]:
    """Inventory name -> Mininet node name: unique, at most NODE_NAME_MAX characters, safe
    for the CLI, and a function of the set of names alone (not of their order)."""
    wanted = sorted(set(names))
    out = {n: n for n in wanted if is_safe(n)}
    used = set(out.values())
    for name in wanted:
        if name in out:
            continue
        salt = 0
        while (candidate := _derived(name, salt)) in used or not is_safe(candidate):
            salt += 1
        out[name] = candidate
        used.add(candidate)
    return out
