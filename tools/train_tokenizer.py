#!/usr/bin/env python
"""Train the byte-fallback SentencePiece tokenizer (see megatron_wsm.cli.train_tokenizer)."""

import sys

from megatron_wsm.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
