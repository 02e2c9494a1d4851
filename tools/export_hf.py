"""Export a checkpoint to Hugging Face (see megatron_wsm/cli/export_hf.py).

The ``__main__`` guard matters: loading/saving with torch_dist may start spawn-based helpers.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.cli.export_hf import main

    sys.exit(main())
