"""Score an exported model with lm-evaluation-harness, offline (see megatron_wsm/export/harness.py).

``python tools/eval_harness.py --model runs/x/hf --output-json harness.json``: the held-out
perplexity and cloze tasks, built from the embedded corpus (nothing is downloaded).
"""

import os
import sys

# Like tools/export_hf.py: runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.export.harness import main

    sys.exit(main())
