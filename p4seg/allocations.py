"""The rule-id allocation on disk: `--allocation FILE`, and the controller's state copy.

A compile starts from the allocation of the last one (compiler.allocation): `p4seg
compile -o DIR` from DIR/allocation.json, the controller from STATE/allocation.json,
which it rewrites after every apply — settled (retired ids freed) only once every
switch of the inventory holds the new version.
"""

from __future__ import annotations

from pathlib import Path

from compiler.allocation import Allocation, AllocationError
from compiler.memo import also_forget
from runtime.files import Parsed, write_atomic

STATE_FILE = "allocation.json"


def read_allocation(path: str | Path) -> Allocation:
    """The allocation in `path`; AllocationError (with the path) when it cannot be used.
    Parsed again only when the file changed (a long-running controller reads it before
    every operation; 1,000 rules' ids and tags take 10 ms to parse)."""
    try:
        return _READ.get(Path(path), lambda text: Allocation.from_json(text, str(path)))
    except (OSError, UnicodeDecodeError) as err:
        raise AllocationError(f"{path}: cannot read the allocation ({err})") from None


_READ: Parsed[Allocation] = Parsed()
also_forget(_READ.clear)


def state_allocation(state_dir: Path) -> Allocation:
    """The controller's allocation (empty before the first apply); AllocationError if bad."""
    path = state_dir / STATE_FILE
    return read_allocation(path) if path.exists() else Allocation()


def save_state_allocation(state_dir: Path, allocation: Allocation) -> None:
    """Replace the controller's allocation atomically (and remember it as read back);
    nothing is written when the file holds it already (an operation that changed no id)."""
    path = state_dir / STATE_FILE
    if _READ.holds(path, allocation):
        return
    write_atomic(path, allocation.to_json())
    _READ.remember(path, allocation)
