#!/usr/bin/env python
"""Benchmark of the Hugging Face export (tools/export_hf.py) against reading the checkpoint once.

Builds one synthetic Mixtral-shaped MoE checkpoint with megatron-core's torch_dist save (default
about 1 GiB of fp32: hidden 1024, 8 experts of width 1024, layers to fit), then measures, each
variant in its own child process so that peak RSS is clean:

- ``read_once``: every model tensor read once, slice by slice, with the exporter's reader (the
  floor: the export cannot read less);
- ``load_all``: torch DCP loads the whole model into memory at once (what a naive export does);
- ``export``: the full export (read, split, safetensors shards of ``--max-shard-size``, fsync,
  atomic rename).

Prints time (and the ratio to ``read_once``) and peak RSS (VmHWM) above the child's RSS after its
imports, next to the
largest single tensor of the checkpoint and the shard size: the export's memory is bounded by
those, not by the model.

    python bench/export_bench.py                 # ≈ 1 GiB, a few minutes on 2 cores
    python bench/export_bench.py --size-gb 0.25 --max-shard-size 100MB
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MIB = 2**20


def _spec(size_gb: float) -> Any:
    from megatron_wsm.testing.synthetic import SyntheticSpec

    @dataclasses.dataclass
    class MixtralSpec(SyntheticSpec):
        """The synthetic MoE minus the tensors Mixtral has no place for (router buffers)."""

        def tensors(self) -> dict[str, tuple[tuple[int, ...], Any, str]]:
            out = super().tensors()
            out.pop("decoder.layers.mlp.router.expert_bias")
            out.pop("decoder.layers.mlp.router.token_counts")
            return out

    hidden, ffn, experts, vocab = 1024, 1024, 8, 1024
    per_layer = 4 * hidden * hidden + experts * 3 * ffn * hidden + experts * hidden + 2 * hidden
    layers = max(1, round(size_gb * 2**30 / 4 / per_layer))
    return MixtralSpec(num_layers=layers, hidden=hidden, ffn=ffn, num_experts=experts,
                       vocab=vocab)


def build(workdir: Path, size_gb: float) -> Path:
    """Save the checkpoint (1 gloo process) with a manifest the exporter understands."""
    import torch.distributed as dist

    from megatron_wsm.checkpoint.manifest import read_manifest, write_manifest
    from megatron_wsm.data.spm_training import train_sentencepiece
    from megatron_wsm.testing.synthetic import save_torch_dist

    spec = _spec(size_gb)
    path = workdir / "ckpt"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        save_torch_dist(path, spec, seed=1, iteration=100, kind="full")
    finally:
        dist.destroy_process_group()
    from megatron_wsm.data.corpus import embedded_documents

    texts = [d.text for d in embedded_documents()]
    tok = train_sentencepiece(texts, workdir / "tok", vocab_size=spec.vocab, seed=1)
    manifest = read_manifest(path)
    model = {"num_layers": spec.num_layers, "hidden_size": spec.hidden, "num_attention_heads": 8,
             "num_experts": spec.num_experts, "moe_ffn_hidden_size": spec.ffn,
             "moe_router_topk": 2, "max_position_embeddings": 4096, "normalization": "RMSNorm",
             "position_embedding_type": "rope", "untie_embeddings_and_output_weights": True,
             "vocab_size": spec.vocab}
    manifest.extra = {"run": {"model": model, "tokenizer_model": str(tok), "seed": 1}}
    write_manifest(path, manifest)
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(variant: str, ckpt: Path, out: Path, max_shard_size: str) -> dict[str, Any]:
    """Run one variant in this process; returns seconds and peak RSS above start."""
    import torch

    # Imports first, so both time and memory count the work, not module loading.
    import megatron_wsm.checkpoint.manager  # noqa: F401
    import megatron_wsm.export.hf  # noqa: F401
    from megatron_wsm.export.reader import CheckpointReader

    start_rss = _status_kib("VmRSS")
    start = time.perf_counter()
    if variant == "read_once":
        reader = CheckpointReader(ckpt)
        for key, shape in reader.model_tensors().items():
            lead = shape[:2] if "experts" in key else shape[:1] if len(shape) > 2 else ()
            for index in _indices(lead):
                reader.read(key, index)
    elif variant == "load_all":
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        sd: dict[str, Any] = {}
        _load_state_dict(sd, storage_reader=FileSystemReader(str(ckpt)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
        assert any(torch.is_tensor(v) for v in sd.values())
    else:
        from megatron_wsm.export.hf import export_checkpoint

        export_checkpoint(ckpt, out, max_shard_size=max_shard_size, overwrite=True)
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
    peak = (_status_kib("VmHWM") - start_rss) * 1024
    return {"seconds": seconds, "peak_rss_mib": peak / MIB}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _indices(lead: tuple[int, ...]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for n in lead:
        out = [(*o, i) for o in out for i in range(n)]
    return out


def main(argv: list[str] | None = None) -> int:
    """Build, run every variant in a child process, print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=1.0)
    p.add_argument("--max-shard-size", default="200MB")
    p.add_argument("--workdir", default=None, help="keep the checkpoint here (default: temp)")
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        variant, ckpt, out = args.child
        print(json.dumps(child(variant, Path(ckpt), Path(out), args.max_shard_size)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        ckpt = build(work, args.size_gb)
        from megatron_wsm.export.reader import CheckpointReader

        shapes = CheckpointReader(ckpt).model_tensors()
        nbytes = {k: 4 * _numel(s) for k, s in shapes.items()}
        rows = {}
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
        for variant in ("read_once", "load_all", "export"):
            proc = subprocess.run(
                [sys.executable, __file__, "--max-shard-size", args.max_shard_size, "--child",
                 variant, str(ckpt), str(work / "hf")],
                check=True, env=env, capture_output=True, text=True)
            rows[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    total = sum(nbytes.values()) / MIB
    print(f"checkpoint: {total:.0f} MiB fp32, largest stored tensor "
          f"{max(nbytes.values()) / MIB:.0f} MiB (all layers stacked), shard {args.max_shard_size}")
    print(f"{'variant':<10} {'seconds':>8} {'x read':>7} {'peak RSS MiB':>13}")
    for name, row in rows.items():
        ratio = row["seconds"] / rows["read_once"]["seconds"]
        print(f"{name:<10} {row['seconds']:8.2f} {ratio:7.2f} {row['peak_rss_mib']:13.0f}")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    sys.exit(main())
