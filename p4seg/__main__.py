"""`python -m p4seg ...` is the `p4seg` command."""

from p4seg.cli import run

run()
