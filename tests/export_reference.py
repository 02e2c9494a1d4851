"""Our model's logits and greedy continuation for the HF export parity tests (torchrun, 1 rank).

    torchrun --nproc-per-node 1 tests/export_reference.py CKPT TOKENS.pt OUT.pt [pretrain flags]

Builds the model from the checkpoint exactly as ``tools/evaluate.py`` does (the manifest's
run config, ``--eval-only --load``), runs one forward over the batch in TOKENS.pt ([B, T] int64)
a 20-token greedy continuation of its first row (argmax over the tokenizer's ids: padded
vocabulary rows are not tokens) and the held-out loss with the samples it was computed on.
"""

import sys

import torch


def main() -> None:
    ckpt, tokens_file, out = sys.argv[1:4]
    from megatron_wsm.arguments import parse_run_config
    from megatron_wsm.checkpoint.megatron_lm import manifest_of
    from megatron_wsm.cli.evaluate import config_from_manifest
    from megatron_wsm.distributed import destroy_distributed
    from megatron_wsm.pretrain import setup

    manifest = manifest_of(ckpt)  # ours, or a Megatron-LM checkpoint's (from its args)
    base = config_from_manifest(manifest)  # the stored vocab padding at any TP size
    cfg, _ = parse_run_config(
        ["--load", ckpt, "--eval-only", "--no-progress-bar", "--micro-batch-size", "1",
         "--global-batch-size", "1", "--eval-iters", "0", *sys.argv[4:]],
        base,
    )
    comp, _ = setup(cfg)
    vocab = int(cfg.model.vocab_size)
    model = comp.model[0]
    model.eval()
    tokens = torch.load(tokens_file)

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        return model(ids, pos, attention_mask=None).float()[..., :vocab]

    with torch.no_grad():
        logits = logits_of(tokens)
        seq = tokens[:1, :8]
        for _ in range(20):
            nxt = logits_of(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    # The held-out split as tools/evaluate.py scores it (the whole split), with its samples so
    # the HF model can be scored on exactly the same tokens.
    from megatron_wsm.training import evaluate

    result = evaluate(comp, "valid")
    valid = comp.datasets["valid"]
    # --eval-iters N > 0 evaluates the first N global batches only: keep just those (a mock-data
    # split holds millions of samples).
    t = cfg.training
    count = len(valid) if not t.eval_iters else min(len(valid), t.eval_iters * t.global_batch_size)
    samples = [valid[i] for i in range(count)]
    torch.save({
        "logits": logits, "greedy": seq[0, 8:].tolist(), "vocab": vocab,
        "valid_loss": result["loss"],
        "valid_tokens": torch.stack([torch.as_tensor(x["tokens"]) for x in samples]),
        "valid_labels": torch.stack([torch.as_tensor(x["labels"]) for x in samples]),
        "valid_loss_mask": torch.stack([torch.as_tensor(x["loss_mask"]) for x in samples]),
    }, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
