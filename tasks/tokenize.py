"""tokenize stage: train the tokenizer on the training split and pack every split into blocks.

With a ``tokenizer`` input, that stage's tokenizer is reused instead of training one.
Writes ``tokenizer/``, ``{split}.npy`` and ``{split}-{domain}.npy`` (int32, shape
(n_blocks, seq_len)), and ``heldout/`` (the clean validation and test documents, which the
evaluate stage turns into lm-eval task examples).
"""
from __future__ import annotations

import numpy as np

from components.data.parquet_io import read_documents, write_documents
from components.data.tokenizer import pack_documents
from tasks.model_io import load_tokenizer_artifact

SPLITS = ("train", "validation", "test")


def run(ctx) -> dict:
    docs = read_documents(ctx.input("docs").path / "docs")
    trainer = ctx.method
    seq_len = trainer.params.seq_len
    train_docs = docs[docs["split"] == "train"]
    if ctx.inputs.get("tokenizer"):  # shared vocabulary: losses of models on different selections compare
        shared = ctx.input("tokenizer")
        tokenizer = load_tokenizer_artifact(shared)
        shared_vocab = shared.manifest.get("params", {}).get("vocab_size")
        if shared_vocab is not None and shared_vocab != trainer.params.vocab_size:
            # the params would be in the digest yet unused: say so instead of silently ignoring them
            raise ValueError(f"stage {ctx.plan.name}: vocab_size {trainer.params.vocab_size} differs from the shared "
                             f"tokenizer's ({shared_vocab}, stage {ctx.plan.inputs['tokenizer'][0]}); a reused "
                             f"tokenizer is not retrained, so use the same params")
    else:
        tokenizer = trainer.train(train_docs["text"].tolist())
    tokenizer.save_pretrained(str(ctx.out_dir / "tokenizer"))
    metrics: dict = {"vocab_size": len(tokenizer), "seq_len": seq_len}
    blocks_total = 0
    for split in SPLITS:
        part = docs[docs["split"] == split]
        if split != "train":  # held-out sets measure the model, so they stay clean
            part = part[part["noise_label"] == ""]
        per_domain = []
        for domain, group in sorted(part.groupby("domain")):
            blocks = _pack(tokenizer, group["text"].tolist(), seq_len)
            np.save(ctx.out_dir / f"{split}-{domain}.npy", blocks)
            metrics[f"blocks_{split}_{domain}"] = len(blocks)
            per_domain.append(blocks)
        all_blocks = np.concatenate(per_domain) if per_domain else np.zeros((0, seq_len), np.int32)
        np.save(ctx.out_dir / f"{split}.npy", all_blocks)
        metrics[f"blocks_{split}"] = len(all_blocks)
        blocks_total += len(all_blocks)
    if metrics["blocks_train"] == 0:
        raise ValueError(f"stage {ctx.plan.name}: the training split packs into 0 blocks of {seq_len} tokens")
    heldout = docs[(docs["split"] != "train") & (docs["noise_label"] == "")]
    write_documents(heldout, ctx.out_dir / "heldout")
    ctx.facts.update(blocks=blocks_total, vocab_size=len(tokenizer), seq_len=seq_len)
    return metrics


def _pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Blocks for one split and domain; a domain too small for one block gets none."""
    try:
        return pack_documents(tokenizer, texts, seq_len)
    except ValueError:
        return np.zeros((0, seq_len), np.int32)
