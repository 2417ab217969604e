"""The reference switch's device config: which pipeline to run, as a small JSON document.

P4Runtime's `ForwardingPipelineConfig.p4_device_config` is opaque, target-specific bytes
(BMv2 takes its JSON). The reference switch executes the pipeline spec itself, so its
device config only names the spec and the table sizes it was compiled with; the switch
rebuilds the pipeline from it and accepts the P4Info only if it describes that pipeline.
"""

from __future__ import annotations

import json

from p4src.spec import DEFAULT_SIZES, Pipeline, build_pipeline

FORMAT = "p4seg-ref/1"


def device_config(pipeline: Pipeline) -> str:
    range_kind = pipeline.table("policy").range_kind
    doc: dict[str, object] = {"format": FORMAT, "pipeline": pipeline.name, "range_kind": range_kind}
    doc["sizes"] = {t.name: t.size for t in pipeline.tables if t.name in DEFAULT_SIZES}
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def pipeline_of(data: bytes) -> Pipeline:
    """The pipeline a device config names; ValueError says what is wrong with it."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the device config is not p4seg reference-switch JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"the device config is not in the {FORMAT} format")
    if doc.get("pipeline") != "p4seg":
        raise ValueError(f"unknown pipeline {doc.get('pipeline')!r} (this switch runs 'p4seg')")
    sizes = doc.get("sizes", {})
    if not isinstance(sizes, dict) or not all(
        k in DEFAULT_SIZES and isinstance(v, int) and 0 < v <= 1 << 20 for k, v in sizes.items()
    ):
        raise ValueError(f"bad table sizes {sizes!r} (tables: {', '.join(DEFAULT_SIZES)})")
    range_kind = doc.get("range_kind", "range")
    if range_kind not in ("range", "ternary"):
        raise ValueError(f"bad range_kind {range_kind!r} (range or ternary)")
    return build_pipeline(sizes, range_kind)
