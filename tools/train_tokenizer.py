#!/usr/bin/env python
"""Train the byte-fallback SentencePiece tokenizer (see megatron_wsm.cli.train_tokenizer)."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.train_tokenizer import main

    sys.exit(main())
