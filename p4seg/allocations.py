"""The rule-id allocation on disk: `--allocation FILE`, and the controller's state copy.

A compile starts from the allocation of the last one (compiler.allocation): `p4seg
compile -o DIR` from DIR/allocation.json, the controller from STATE/allocation.json,
which it rewrites after every apply — settled (retired ids freed) only once every
switch of the inventory holds the new version.
"""

from __future__ import annotations

from pathlib import Path

from compiler.allocation import Allocation, AllocationError
from runtime.files import write_atomic

STATE_FILE = "allocation.json"


def read_allocation(path: str | Path) -> Allocation:
    """The allocation in `path`; AllocationError (with the path) when it cannot be used."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AllocationError(f"{path}: cannot read the allocation ({err})") from None
    return Allocation.from_json(text, str(path))


def state_allocation(state_dir: Path) -> Allocation:
    """The controller's allocation (empty before the first apply); AllocationError if bad."""
    path = state_dir / STATE_FILE
    return read_allocation(path) if path.exists() else Allocation()


def save_state_allocation(state_dir: Path, allocation: Allocation) -> None:
    """Replace the controller's allocation atomically."""
    write_atomic(state_dir / STATE_FILE, allocation.to_json())
