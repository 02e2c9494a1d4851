#!/usr/bin/env python
"""Merge a window of checkpoints with WSM weights (see megatron_wsm.cli.merge_wsm, --help)."""

import os
import sys

try:
    import megatron_wsm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.merge_wsm import main

if __name__ == "__main__":
    sys.exit(main())
