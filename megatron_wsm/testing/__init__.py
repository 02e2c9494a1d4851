"""Test support shipped with the package (not used by training or the tools).

- :mod:`~megatron_wsm.testing.synthetic`: synthetic torch_dist / legacy MoE checkpoints for the
  merge's tests and benchmark (``python -m megatron_wsm.testing.synthetic JOB.json``);
- :mod:`~megatron_wsm.testing.launch`: run the trainer and tools under torchrun in fresh
  processes (megatron-core keeps process-global state, so every run gets its own);
- :mod:`~megatron_wsm.testing.config`: a tiny MoE as flags and as a ``RunConfig``;
- :mod:`~megatron_wsm.testing.router`: megatron-core's MoE router on a CPU-only torch.

Submodules are imported on use: ``launch`` needs the standard library only. The free-port
helper they use is production code (:mod:`megatron_wsm.ports`, also the trainer's): this package
may import the rest of megatron-wsm, never the reverse.
"""
