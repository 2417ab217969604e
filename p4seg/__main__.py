"""`python -m p4seg ...` is the `p4seg` command."""

import sys

from p4seg.cli import main

sys.exit(main())
