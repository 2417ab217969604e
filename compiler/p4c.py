"""p4c, when it is installed: BMv2 JSON for the build, and p4c's own P4Info to compare.

p4c is not a dependency: without `p4c-bm2-ss` on PATH, builds simply carry no BMv2 JSON
(the reference switch needs none) and the comparison tests skip, saying why.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from compiler.diagnostics import P4segError, error
from compiler.targets import device_config_file, program_file

if TYPE_CHECKING:
    from compiler.emit import Build

P4C_BMV2 = "p4c-bm2-ss"


class P4cError(P4segError):
    """p4c rejected or warned about a generated program: a p4seg bug, reported as such."""


def p4c_available() -> str | None:
    return shutil.which(P4C_BMV2)


def compile_v1model(source: str) -> tuple[str, str]:
    """(BMv2 JSON, p4c's P4Info text) for a v1model program; warnings count as errors."""
    exe = p4c_available()
    if exe is None:
        raise P4cError([error("E503", f"{P4C_BMV2} is not on PATH", None)])
    with tempfile.TemporaryDirectory(prefix="p4seg-p4c-") as tmp:
        # Relative names: p4c records the source path in the JSON, and builds must not
        # depend on where the temporary directory happened to be.
        (Path(tmp) / "p4seg.p4").write_text(source)
        cmd = [
            exe,
            "--std",
            "p4-16",
            "--arch",
            "v1model",
            "--p4runtime-files",
            "p4info.txtpb",
            "-o",
            "p4seg.json",
            "p4seg.p4",
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, check=False, cwd=tmp
        )
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or "warning" in output.lower():
            raise P4cError(
                [
                    error(
                        "E503",
                        f"{P4C_BMV2} rejected the generated program (a p4seg bug):\n{output}",
                        None,
                    )
                ]
            )
        return (Path(tmp) / "p4seg.json").read_text(), (Path(tmp) / "p4info.txtpb").read_text()


def p4c_artifacts(build: Build) -> dict[str, str]:
    """p4c's BMv2 JSON for a bmv2 build, when p4c is installed (ref has its own device config)."""
    kind = build.target.kind
    if kind.program != "v1model" or kind.own_device_config or p4c_available() is None:
        return {}
    source = build.files[program_file(build.target.name)]
    bmv2_json, _ = compile_v1model(source)
    return {device_config_file(build.target.name): bmv2_json}
