"""Render the P4 programs from the pipeline spec (Jinja2 templates in p4src/templates)."""

from __future__ import annotations

from functools import cache

import jinja2

from p4src.spec import (
    CPU_CLONE_SESSION,
    PIPELINE,
    REASON_DENY_LOG,
    REASON_SPOOF,
    RULE_ID_BITS,
    TAG_BITS,
    Pipeline,
)

PROGRAM_TEMPLATES = {"v1model": "v1model.p4.j2", "tna": "tna.p4.j2"}
DEFAULT_CPU_PORT = 255


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("p4src", "templates"),
        undefined=jinja2.StrictUndefined,  # a typo in a template is an error, not empty text
        keep_trailing_newline=True,
        trim_blocks=False,
        lstrip_blocks=False,
        autoescape=False,
    )


def render_program(
    program: str, pipeline: Pipeline = PIPELINE, cpu_port: int = DEFAULT_CPU_PORT
) -> str:
    """P4_16 source of the pipeline for an architecture (`v1model` or `tna`)."""
    template = _environment().get_template(PROGRAM_TEMPLATES[program])
    text = template.render(
        pipeline=pipeline,
        cpu_port=cpu_port,
        clone_session=CPU_CLONE_SESSION,
        reason_deny_log=REASON_DENY_LOG,
        reason_spoof=REASON_SPOOF,
        tag_bits=TAG_BITS,
        rule_id_bits=RULE_ID_BITS,
    )
    # Templates are written for reading; the output keeps at most one blank line in a row.
    lines: list[str] = []
    for line in text.splitlines():
        if line.strip() or (lines and lines[-1].strip()):
            lines.append(line.rstrip())
    return "\n".join(lines).strip() + "\n"
