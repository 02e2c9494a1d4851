"""``tools/export_hf.py --load CKPT --save HF_DIR``: a checkpoint as a Hugging Face model, in
the architecture of its family (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3:
docs/export.md).

CKPT is any torch_dist checkpoint megatron-wsm writes (full, window or merged; any TP/PP/EP
layout), or a directory of them (the newest complete one is used). No GPU and no process group
are needed: tensors are read one slice at a time. The output (``config.json``, safetensors
shards, tokenizer, ``generation_config.json``, ``wsm_export.json`` provenance and a model card)
appears atomically: a killed export leaves no HF_DIR. Needs ``pip install -e .[hf]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="export_hf.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--load", required=True, help="checkpoint directory (or a save dir)")
    p.add_argument("--save", required=True, help="output Hugging Face model directory")
    p.add_argument("--dtype", choices=("same", "fp32", "bf16"), default="same",
                   help="dtype of the exported weights (default: as stored)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="split model.safetensors into shards of at most this size (default 5GB)")
    p.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece model (default: the run's, from the manifest / data cache)")
    p.add_argument("--data-cache-dir", default="data_cache",
                   help="the training run's --data-cache-dir (embedded-corpus tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save")
    p.add_argument("--output-json", default=None, help="write the export report here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; exit code 0, or 2 with a one-line ``error:`` on refusal."""
    args = build_parser().parse_args(argv)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print("error: export needs safetensors: pip install -e '.[hf]'", file=sys.stderr)
        return 2
    from megatron_wsm.export.hf import export_checkpoint
    from megatron_wsm.export.mapping import ExportError

    try:
        report = export_checkpoint(
            args.load, args.save, dtype=args.dtype, max_shard_size=args.max_shard_size,
            tokenizer_model=args.tokenizer_model, data_cache_dir=args.data_cache_dir,
            overwrite=args.overwrite,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {report.source} (iteration {report.iteration}) → {report.save} "
        f"({report.architecture}): "
        f"{report.tensors} tensors, {report.shards} shard(s), {report.bytes / 2**20:.1f} MiB "
        f"{report.dtype}, vocabulary {report.vocab_size} (padded {report.padded_vocab_size}), "
        f"{report.seconds:.1f} s"
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dataclasses.asdict(report), f, indent=2)
    return 0
