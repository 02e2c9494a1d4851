"""What the export reads back from a manifest: the run as ``RunConfig.from_json`` rebuilds it,
for manifests with run info and for older ones that recorded only the model shapes."""

from __future__ import annotations

from megatron_wsm.checkpoint.manager import model_identity
from megatron_wsm.checkpoint.manifest import CheckpointManifest
from megatron_wsm.config import ModelConfig, RunConfig
from megatron_wsm.export.hf import embedded_tokenizer_settings


def _run() -> RunConfig:
    cfg = RunConfig()
    cfg.model.num_layers, cfg.model.normalization, cfg.model.vocab_size = 3, "RMSNorm", 777
    cfg.data.vocab_size, cfg.training.seed = 777, 11
    return cfg


def test_run_info_round_trips_the_whole_run() -> None:
    cfg = _run()
    manifest = CheckpointManifest(kind="full", iteration=4, extra={"run": cfg.to_json()})
    assert RunConfig.from_json(manifest.run_info()) == cfg
    data, seed = embedded_tokenizer_settings(manifest.run_info())
    assert (data.vocab_size, seed) == (777, 11)


def test_manifest_without_run_info_gives_shapes_and_vocabulary() -> None:
    model = ModelConfig(num_layers=5, hidden_size=48, normalization="RMSNorm", vocab_size=1000)
    manifest = CheckpointManifest(
        kind="merged", iteration=4, model_config=model_identity(model.to_json(), 1024)
    )
    back = RunConfig.from_json(manifest.run_info())
    assert (back.model.num_layers, back.model.hidden_size) == (5, 48)
    assert back.model.normalization == "RMSNorm" and back.data.vocab_size == 1000
    # Fields the manifest did not record take the config's defaults, as in the trainer.
    assert back.model.moe_aux_loss_coeff == ModelConfig().moe_aux_loss_coeff
    data, _ = embedded_tokenizer_settings(manifest.run_info())
    assert data.vocab_size == 1000


def test_run_info_with_only_a_model_takes_the_models_vocabulary() -> None:
    run = {"model": {"num_layers": 2, "vocab_size": 321}, "seed": 3}
    data, seed = embedded_tokenizer_settings(run)
    assert (data.vocab_size, seed) == (321, 3)
