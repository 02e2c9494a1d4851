"""List the checkpoints under a directory (see megatron_wsm/cli/list_checkpoints.py)."""

import sys

from megatron_wsm.cli.list_checkpoints import main

if __name__ == "__main__":
    sys.exit(main())
