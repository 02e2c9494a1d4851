#!/usr/bin/env python
"""Merge a window of checkpoints with WSM weights (see megatron_wsm.cli.merge_wsm, --help)."""

import sys

from megatron_wsm.cli.merge_wsm import main

if __name__ == "__main__":
    sys.exit(main())
