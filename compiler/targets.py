"""The targets p4seg compiles for, and every way they differ: the one place that knows.

Stages and verbs ask a :class:`Target` (which program it runs, whether it matches ranges,
whether p4seg ships its device config, whether it can run here) instead of comparing
target names:

    >>> make_target("tofino").program, make_target("tofino").has_range
    ('tna', False)
    >>> [t for t in TARGET_NAMES if TARGETS[t].runs_here]
    ['ref', 'bmv2']
"""

from __future__ import annotations

from dataclasses import dataclass

from p4src.spec import Pipeline, build_pipeline


@dataclass(frozen=True, slots=True)
class TargetKind:
    """What a kind of switch is, independent of table sizes."""

    name: str
    description: str
    program: str  # the architecture of the P4 program it runs: v1model | tna
    has_range: bool  # the `range` match kind; without it fit expands ranges to ternary
    own_device_config: bool  # p4seg ships the device config (the reference switch's JSON)
    runs_here: bool  # p4seg brings it up and drives it (Mininet floors, the controller)
    resource_estimate: bool  # the report estimates per-stage resources (Tofino's TCAM/SRAM)
    sizes: tuple[tuple[str, int], ...] = ()  # its default table sizes, over DEFAULT_SIZES
    # An INSERT without a meter config may keep a deleted entry's direct meter (BMv2 reuses
    # the slot and resets only its counter): follow it with a DirectMeterEntry MODIFY.
    stale_direct_meters: bool = False


TARGETS: dict[str, TargetKind] = {
    kind.name: kind
    for kind in (
        TargetKind("ref", "p4seg reference switch", "v1model", True, True, True, False),
        TargetKind(
            "bmv2",
            "BMv2 simple_switch_grpc",
            "v1model",
            True,
            False,
            True,
            False,
            stale_direct_meters=True,
        ),
        # The policy key is 561 bits (13 TCAM blocks per 512 entries): 6144 entries take 7
        # stages, and the whole pipeline 11 of Tofino's 12 (compiler.emit.tofino_stages).
        TargetKind("tofino", "Tofino (TNA)", "tna", False, False, False, True, (("policy", 6144),)),
    )
}
TARGET_NAMES = tuple(TARGETS)  # DESIGN.md vocabulary: where tables run
LIVE_TARGETS = tuple(name for name, kind in TARGETS.items() if kind.runs_here)


@dataclass(frozen=True, slots=True)
class Target:
    """A target kind with the pipeline (table sizes, match kinds) a compile uses."""

    kind: TargetKind
    pipeline: Pipeline

    @property
    def name(self) -> str:
        return self.kind.name

    @property
    def description(self) -> str:
        return self.kind.description

    @property
    def program(self) -> str:
        return self.kind.program

    @property
    def has_range(self) -> bool:
        return self.kind.has_range


# Where a build directory keeps its pipeline: the P4Info, and per target its program and
# device config (p4c's BMv2 JSON, or the reference switch's own config). Read back by the
# controller (runtime/controller.py PipelineFiles) and the shell (runtime/shell.py).
P4INFO_FILE = "p4info.txtpb"


def program_file(target: str) -> str:
    return f"p4/{target}/p4seg.p4"


def device_config_file(target: str) -> str:
    return f"p4/{target}/p4seg.json"


def make_target(name: str, sizes: dict[str, int] | None = None) -> Target:
    """The target `name` with table `sizes` (defaults: the target's, then
    p4src.spec.DEFAULT_SIZES)."""
    kind = TARGETS.get(name)
    if kind is None:
        raise ValueError(f"unknown target '{name}' ({', '.join(TARGET_NAMES)})")
    sizes = {**dict(kind.sizes), **(sizes or {})}
    return Target(kind, build_pipeline(sizes, "range" if kind.has_range else "ternary"))
