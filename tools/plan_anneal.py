#!/usr/bin/env python
"""Fit the annealing loss law to training logs and plan a decay / WSM merge (megatron_wsm.cli)."""

import os
import sys

try:
    import megatron_wsm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.plan_anneal import main

if __name__ == "__main__":
    sys.exit(main())
