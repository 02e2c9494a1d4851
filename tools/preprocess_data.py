#!/usr/bin/env python
"""Tokenize text into megatron-core .bin/.idx datasets (see megatron_wsm.cli.preprocess_data)."""

import sys

from megatron_wsm.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
