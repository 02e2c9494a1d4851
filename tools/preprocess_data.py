#!/usr/bin/env python
"""Tokenize text into megatron-core .bin/.idx datasets (see megatron_wsm.cli.preprocess_data)."""

import os
import sys

try:
    import megatron_wsm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
