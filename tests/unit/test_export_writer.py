"""Export plumbing without a model: slice reader, shard planning, atomic publishing."""

from __future__ import annotations

import pytest
import torch

from megatron_wsm.checkpoint import publish
from megatron_wsm.export import writer
from megatron_wsm.export.mapping import ExportError, TensorSpec
from megatron_wsm.export.reader import CheckpointReader


def _save_dcp(path, tensors):
    import torch.distributed.checkpoint as dcp

    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=True)


def test_reader_reads_slices_of_global_tensors(tmp_path):
    torch.manual_seed(0)
    stacked = torch.randn(3, 4, 5, 6)
    flat = torch.randn(7, 2).to(torch.bfloat16)
    _save_dcp(tmp_path, {"a.weight": stacked, "b.weight": flat, "count": torch.tensor(3),
                         "optimizer.state.exp_avg.a.weight": stacked,
                         "chained_1.optimizer.state.exp_avg.b.weight": flat})
    r = CheckpointReader(tmp_path)
    assert r.model_tensors() == {"a.weight": (3, 4, 5, 6), "b.weight": (7, 2)}
    assert torch.equal(r.read("a.weight", (2,)), stacked[2])
    assert torch.equal(r.read("a.weight", (1, 3)), stacked[1, 3])
    assert torch.equal(r.read("b.weight"), flat) and r.dtype("b.weight") == torch.bfloat16
    with pytest.raises(ExportError, match="outside global shape"):
        r.read("a.weight", (3,))
    with pytest.raises(ExportError, match="no tensor nope"):
        r.read("nope")


def test_reader_refuses_damaged_checkpoint(tmp_path):
    _save_dcp(tmp_path, {"a.weight": torch.randn(64, 64)})
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ExportError, match="is damaged: .*past the end"):
        CheckpointReader(tmp_path)
    with pytest.raises(ExportError, match="not a torch_dist checkpoint"):
        CheckpointReader(tmp_path / "missing")


@pytest.mark.parametrize(
    "text,value",
    [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1000", 1000),
     ("1.5kb", 1500)],
)
def test_parse_size(text, value):
    assert writer.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "5 GX", "-1GB", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(ExportError, match="--max-shard-size"):
        writer.parse_size(text)


def _spec(name, n):
    return TensorSpec(name, "k", (), "all", (n,))


def test_plan_shards_bounds_size_and_keeps_order():
    specs = [_spec(f"t{i}", n) for i, n in enumerate([3, 3, 5, 1, 12, 2])]
    shards = writer.plan_shards(specs, lambda s: s.numel(), 6)
    assert [[s.name for s in shard] for shard in shards] == [
        ["t0", "t1"], ["t2", "t3"], ["t4"], ["t5"]
    ]
    assert writer.plan_shards(specs, lambda s: s.numel(), 100) == [specs]
    assert writer.shard_names(1) == ["model.safetensors"]
    assert writer.shard_names(2)[1] == "model-00002-of-00002.safetensors"


def _fill(*names):
    def fill(tmp):
        writer.write_json(tmp / writer.MARKER_NAME, {"format": writer.EXPORT_FORMAT})
        for name in names:
            (tmp / name).write_text("{}")
    return fill


def test_publish_is_atomic(tmp_path):
    save = tmp_path / "hf"

    def failing(tmp):
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        writer.publish_export(save, False, failing)
    assert not save.exists() and list(tmp_path.iterdir()) == []
    # A leftover of a SIGKILLed export (a dead PID of this host) is hidden; the next export
    # into the same --save removes it.
    dead = publish.temp_name(save, writer.TMP_TAG).rsplit("-", 1)[0] + "-999999999"
    (tmp_path / dead).mkdir()
    writer.publish_export(save, False, _fill("config.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    with pytest.raises(ExportError, match="exists"):
        writer.publish_export(save, False, lambda tmp: None)
    writer.publish_export(save, True, _fill("generation_config.json"))
    assert sorted(p.name for p in save.iterdir()) == ["generation_config.json",
                                                       writer.MARKER_NAME]
