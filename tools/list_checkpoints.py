"""List the checkpoints under a directory (see megatron_wsm/cli/list_checkpoints.py)."""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.list_checkpoints import main

    sys.exit(main())
