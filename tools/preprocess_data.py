#!/usr/bin/env python
"""Tokenize text into megatron-core .bin/.idx datasets (see megatron_wsm.cli.preprocess_data)."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.preprocess_data import main

    sys.exit(main())
