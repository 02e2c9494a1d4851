#!/usr/bin/env python
"""Fit the annealing loss law to training logs and plan a decay / WSM merge (megatron_wsm.cli)."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.plan_anneal import main

    sys.exit(main())
