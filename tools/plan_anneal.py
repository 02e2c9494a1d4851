#!/usr/bin/env python
"""Fit the annealing loss law to training logs and plan a decay / WSM merge (megatron_wsm.cli)."""

import sys

from megatron_wsm.cli.plan_anneal import main

if __name__ == "__main__":
    sys.exit(main())
