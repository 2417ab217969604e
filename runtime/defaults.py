"""Controller defaults, in a module with no imports so that the command line can show them
in `--help` without loading finsy and grpc."""

from __future__ import annotations

DEFAULT_ELECTION_ID = 10
# Updates per Write: bounded so a failing batch's error details fit gRPC's trailers.
DEFAULT_BATCH = 500
