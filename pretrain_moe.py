"""Pretrain a Mixture-of-Experts GPT on megatron-core with Warmup-Stable-Merge.

    torchrun --nproc-per-node 2 pretrain_moe.py --expert-model-parallel-size 2 ...

See ``--help`` and README.md. The ``__main__`` guard matters: torch_dist checkpoint saving
starts a spawn-based multiprocessing manager that re-imports this file.
"""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: a spawned helper (torch_dist saving starts a spawn-based
    # multiprocessing manager) re-imports this file and should not import megatron-core again.
    from megatron_wsm.pretrain import main

    sys.exit(main())
