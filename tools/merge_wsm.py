#!/usr/bin/env python
"""Merge a window of checkpoints with WSM weights (see megatron_wsm.cli.merge_wsm, --help)."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.merge_wsm import main

    sys.exit(main())
