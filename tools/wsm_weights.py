#!/usr/bin/env python
"""Print or plot WSM merge coefficients and the decay they emulate (see megatron_wsm.cli)."""

import os
import sys

try:
    import megatron_wsm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.wsm_weights import main

if __name__ == "__main__":
    sys.exit(main())
