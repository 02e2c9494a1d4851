#!/usr/bin/env python
"""Print or plot WSM merge coefficients and the decay they emulate (see megatron_wsm.cli)."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.wsm_weights import main

    sys.exit(main())
