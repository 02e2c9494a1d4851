"""Checkpoints: their format, integrity, layout, manifest and I/O, in one place.

Nothing is imported here (importing the package stays cheap and free of megatron-core); import
the module you need:

===================  ==========================================================================
``dcp_format``       torch_dist bytes: storage records, zip items, CRCs (torch internals)
``integrity``        a checkpoint's files vs its ``.metadata``: restricted unpickling, shard
                     names and ranges, CRC-32 of every item, regular-file bounded reads
``common_state``     a checkpoint's common (non-tensor) state (``common.pt`` or megatron-core
                     0.19's embedded ``common_state``), read without trusting it
``megatron_args``    the ``args`` Namespace Megatron-LM's loader reads (data position, shape)
``manifest``         ``wsm_manifest.json``: what a checkpoint holds, complete flag, schema
``layout``           names, listing, completeness, the window rule and retention (one owner for
                     the trainer, the merge and the tools)
``optimizer_state``  pure: which optimizer state a checkpoint holds, can it load here
``keys``             one key scheme for the local and Transformer Engine layer specs
``rng``              RNG states with their device kind (restored only on the same kind)
``manager``          ``CheckpointManager``: full and window saves and loading (the one place
                     that saves and loads through megatron-core's ``dist_checkpointing``)
``lock``             one trainer per save directory
``publish``          where the merge and the export may write and what ``--overwrite`` may
                     replace; atomic publishing
===================  ==========================================================================

Dependencies run one way: ``dcp_format`` ← ``integrity`` ← ``common_state`` ← ``layout`` ←
``manager``; the others stand alone or use ``integrity`` only.
"""
