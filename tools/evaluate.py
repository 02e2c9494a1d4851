"""Evaluate a checkpoint on the held-out split (see megatron_wsm/cli/evaluate.py).

The ``__main__`` guard matters: loading/saving with torch_dist may start spawn-based helpers.
"""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.evaluate import main

    sys.exit(main())
