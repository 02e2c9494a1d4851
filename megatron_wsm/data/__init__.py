"""Data pipeline: embedded corpus, SentencePiece tokenizer, indexed and GPT datasets.

Submodules (imported explicitly; this package imports nothing so light tools stay fast):

* :mod:`~megatron_wsm.data.corpus` — the embedded default corpus and its split by document;
* :mod:`~megatron_wsm.data.env_python` — the ``env-python`` corpus (this environment's ``.py``);
* :mod:`~megatron_wsm.data.tokenizer` — ``train_sentencepiece`` and ``SentencePieceTokenizer``;
* :mod:`~megatron_wsm.data.indexed` — text → megatron-core ``.bin``/``.idx``;
* :mod:`~megatron_wsm.data.prepare` — ``prepare_embedded_data`` / ``prepare_env_python_data``
  (cached, lock-protected);
* :mod:`~megatron_wsm.data.datasets` — ``build_gpt_datasets``.

See ``docs/data.md``.
"""
