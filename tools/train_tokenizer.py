#!/usr/bin/env python
"""Train the byte-fallback SentencePiece tokenizer (see megatron_wsm.cli.train_tokenizer)."""

import os
import sys

try:
    import megatron_wsm  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_wsm.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
