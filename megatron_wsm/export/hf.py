"""Export a megatron-wsm checkpoint to a Hugging Face directory (the whole pipeline): Mixtral,
Qwen2-MoE, Qwen3-MoE or DeepSeek-V2/V3, whichever the model is
(:mod:`megatron_wsm.export.families`).

Order matters: everything that can refuse (manifest, metadata, storage ranges, what the
architecture can express, shapes, tokenizer) is checked before the first byte is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from megatron_wsm.export import families, mapping, plans, writer
from megatron_wsm.export import tokenizer as tok
from megatron_wsm.export.mapping import ExportError
from megatron_wsm.export.reader import CheckpointReader

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
PROVENANCE_NAME = writer.MARKER_NAME


@dataclasses.dataclass
class ExportReport:
    """What an export wrote."""

    save: str
    source: str
    iteration: int
    tensors: int
    shards: int
    bytes: int
    dtype: str
    seconds: float
    vocab_size: int
    padded_vocab_size: int
    architecture: str = ""  #: the transformers class written (``MixtralForCausalLM``, ...)


def embedded_tokenizer_settings(run: dict[str, Any]) -> tuple[Any, int]:
    """A run info's data config and seed (``RunConfig.from_json``); without a recorded
    ``vocab_size`` the model's (a run info that holds only the model)."""
    from megatron_wsm.config import RunConfig

    cfg = RunConfig.from_json(run)
    if not run.get("vocab_size") and not (run.get("data") or {}).get("vocab_size"):
        cfg.data.vocab_size = int(cfg.model.vocab_size or cfg.data.vocab_size)
    return cfg.data, cfg.training.seed


def _tokenizer_path(run: dict[str, Any], override: str | None, data_cache_dir: str) -> str:
    if override:
        return override
    from megatron_wsm.data.prepare import prepare_embedded_data

    data, seed = embedded_tokenizer_settings(run)
    if data.tokenizer_model:
        return str(data.tokenizer_model)
    # The run trained its tokenizer on the embedded corpus: the same settings find (or rebuild,
    # deterministically) the same model in the data cache.
    vocab = data.vocab_size
    prepared = prepare_embedded_data(data_cache_dir, vocab_size=vocab, seed=seed)
    return prepared.tokenizer_model


def _export_tokenizer(
    run: dict[str, Any], model: dict[str, Any], override: str | None, data_cache_dir: str
) -> tok.ExportTokenizer:
    """The run's tokenizer: ``--tokenizer-model`` (a SentencePiece ``.model``) when given, else
    the run's ``--tokenizer-type`` tokenizer or its SentencePiece model (built-in corpus: the
    one in the data cache)."""
    data, _ = embedded_tokenizer_settings(run)
    max_length = int(model.get("max_position_embeddings") or 0)
    sentencepiece_types = (None, "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                           "Llama2Tokenizer")  # fmt: skip
    if override or data.tokenizer_type in sentencepiece_types:
        path = _tokenizer_path(run, override, data_cache_dir)
        return tok.sentencepiece_tokenizer(path, max_length)
    return tok.megatron_tokenizer(data)


def export_checkpoint(
    load: str | os.PathLike,
    save: str | os.PathLike,
    *,
    dtype: str = "same",
    max_shard_size: str = "5GB",
    tokenizer_model: str | None = None,
    data_cache_dir: str = "data_cache",
    overwrite: bool = False,
) -> ExportReport:
    """Export checkpoint ``load`` to the HF directory ``save``; raises :class:`ExportError`."""
    from megatron_wsm.checkpoint.manager import CheckpointError, resolve_load_dir
    from megatron_wsm.checkpoint.megatron_lm import manifest_of

    start = time.perf_counter()
    max_bytes = writer.parse_size(max_shard_size)
    if dtype not in ("same", *DTYPES):
        raise ExportError(f"--dtype {dtype!r}: expected same, fp32 or bf16")
    try:
        path = resolve_load_dir(load)
        manifest = manifest_of(path)  # ours, else from a Megatron-LM checkpoint's args
    except (CheckpointError, ValueError) as e:
        raise ExportError(str(e)) from e
    writer.check_save(Path(save), overwrite, inputs=[load, path])
    if manifest is None:
        raise ExportError(f"{path} has no wsm_manifest.json: the model config is unknown")
    from megatron_wsm.checkpoint.layout import checkpoint_problems

    # The same checks as --load and the merge: name, manifest and common state agree, the
    # files are the ones .metadata describes (CRCs of what is read are checked while reading).
    problems = checkpoint_problems(path, manifest)
    if problems:
        raise ExportError(
            f"refusing to export {path}: {problems[0]}"
            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    if not manifest.complete:
        raise ExportError(f"{path} is marked incomplete")
    if manifest.checkpoint_format != "torch_dist":
        raise ExportError(
            f"{path} is in the {manifest.checkpoint_format!r} format; the export reads only "
            "torch_dist checkpoints (what the megatron-wsm trainer writes)"
        )
    from megatron_wsm.config import RunConfig

    # The model as the trainer rebuilds it: the run info's fields, the config's defaults for
    # what an older manifest did not record.
    run = manifest.run_info()
    try:
        model = RunConfig.from_json(run).model.to_json()
    except (TypeError, ValueError) as e:
        raise ExportError(f"{path}: the manifest's run info does not read back: {e}") from e
    reader = CheckpointReader(path)
    keys = reader.model_tensors()
    # The architecture follows the model (families.choose_family); everything it cannot
    # express is refused here, all reasons at once.
    family = families.check_exportable(model, list(keys))

    export_tok = _export_tokenizer(run, model, tokenizer_model, data_cache_dir)
    vocab = export_tok.vocab_size
    if model.get("vocab_size") and int(model["vocab_size"]) != vocab:
        raise ExportError(
            f"tokenizer {export_tok.source} has {vocab} tokens but the model was trained with "
            f"{model['vocab_size']}"
        )
    shapes = plans.family_shapes(model, vocab, family)
    specs = plans.plan(shapes, keys)
    out_dtypes = {
        spec.name: DTYPES.get(dtype, reader.dtype(spec.key) if spec.key else torch.float32)
        for spec in specs
    }
    names = {_DTYPE_NAMES.get(d, str(d)) for d in out_dtypes.values()}
    config_dtype = names.pop() if len(names) == 1 else "float32"

    def nbytes(spec: mapping.TensorSpec) -> int:
        return spec.numel() * torch.empty((), dtype=out_dtypes[spec.name]).element_size()

    shards = writer.plan_shards(specs, nbytes, max_bytes)

    def produce(spec: mapping.TensorSpec) -> torch.Tensor:
        if not spec.key:  # no stored source (a zero router correction bias)
            return mapping.apply_part(spec, shapes, torch.empty(0)).to(out_dtypes[spec.name])
        source = reader.read(spec.key, spec.index)
        if not bool(torch.isfinite(source).all()):
            # A diverged run's checkpoint: an HF model of NaN/inf weights is no model.
            raise ExportError(
                f"{path}: {spec.key} holds non-finite values (NaN or inf); refusing to export it"
            )
        return mapping.apply_part(spec, shapes, source).to(out_dtypes[spec.name])

    provenance = _provenance(path, manifest, run, dtype, export_tok.source)
    bos, eos = export_tok.bos_id, export_tok.eos_id
    hf_config = plans.hf_config(model, shapes, bos, eos, config_dtype)

    def fill(tmp: Path) -> None:
        index = writer.write_shards(tmp, shards, produce, {"format": "pt"})
        if index is not None:
            writer.write_json(tmp / writer.INDEX_NAME, index)
        writer.write_json(tmp / "config.json", hf_config)
        writer.write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": bos,
                "eos_token_id": eos,
                "pad_token_id": export_tok.pad_id,
                "do_sample": False,
            },
        )
        export_tok.write(tmp)
        writer.write_json(tmp / PROVENANCE_NAME, provenance)
        (tmp / "README.md").write_text(model_card(provenance, hf_config))

    writer.publish_export(Path(save), overwrite, fill, inputs=[load, path])
    total = sum(nbytes(s) for s in specs)
    return ExportReport(
        save=str(save),
        source=str(path),
        iteration=manifest.iteration,
        tensors=len(specs),
        shards=len(shards),
        bytes=total,
        dtype=config_dtype,
        seconds=round(time.perf_counter() - start, 3),
        vocab_size=vocab,
        padded_vocab_size=keys[mapping.EMBEDDING][0],
        architecture=families.ARCHITECTURES[family],
    )


def _provenance(
    path: Path, manifest: Any, run: dict[str, Any], dtype: str, tok_path: str
) -> dict[str, Any]:
    prov = manifest.extra.get("provenance") or {}
    merge = None
    if prov:
        merge = {
            k: prov.get(k)
            for k in (
                "inputs",
                "method",
                "coefficients",
                "implied_decay",
                "format",
                "output_dtype",
                "created",
            )
        }
    return {
        "format": writer.EXPORT_FORMAT,
        "version": 1,
        "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": str(path),
        "kind": manifest.kind,
        "iteration": manifest.iteration,
        "consumed_tokens": manifest.consumed_tokens,
        "consumed_samples": manifest.consumed_samples,
        "model_config_hash": manifest.model_config_hash,
        "parallel": dataclasses.asdict(manifest.parallel),
        "megatron_core_version": manifest.megatron_core_version,
        "run": run,
        "merge": merge,
        "dtype": dtype,
        "tokenizer_model": tok_path,
    }


def _experts(config: dict[str, Any]) -> Any:
    for field in ("num_local_experts", "num_experts", "n_routed_experts"):
        if field in config:
            return config[field]
    return "?"


def model_card(prov: dict[str, Any], config: dict[str, Any]) -> str:
    """A short README.md saying what the model is and where it came from."""
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [{config['model_type']}, moe, megatron-wsm]",
        "---",
        "",
        f"# megatron-wsm export: {prov['kind']} checkpoint, iteration {prov['iteration']}",
        "",
        f"- source: `{prov['source']}`",
        f"- tokens seen: {prov['consumed_tokens']:,}",
        f"- architecture: {config['architectures'][0]}",
        f"- shape: {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
        f"{config['num_attention_heads']} heads ({config['num_key_value_heads']} KV), "
        f"{_experts(config)} experts (top-{config['num_experts_per_tok']}), "
        f"vocabulary {config['vocab_size']}",
    ]
    merge = prov.get("merge")
    if merge:
        coeffs = ", ".join(f"{c:.4g}" for c in merge.get("coefficients") or [])
        lines += [
            f"- merge: method `{json.dumps(merge.get('method'))}`, coefficients [{coeffs}]",
            "- merge inputs:",
        ]
        lines += [f"  - `{i}`" for i in merge.get("inputs") or []]
    lines += ["", f"Full provenance: `{PROVENANCE_NAME}`.", ""]
    return "\n".join(lines)
