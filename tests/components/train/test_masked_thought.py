"""Masked Thought: only target-side input tokens are masked, at rate p, labels intact, seeded per step."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from components.data.arithmetic_formats import (  # noqa: E402
    FORMATS, ArithmeticFormattedSource, format_completion, format_prompt, unique_problems,
)
from components.data.tokenizer import pack_documents  # noqa: E402
from components.model.presets import build_model  # noqa: E402
from components.train.masked_thought import MaskedThought, MaskedThoughtError  # noqa: E402
from components.train.registry import FINETUNE_METHODS, PRETRAIN_METHODS  # noqa: E402
from components.train.trainer import train  # noqa: E402

SEQ = 48


def char_tokenizer():
    """One token per character (no merges), ``</s>`` as eos/pad: positions map 1:1 to characters."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(format_prompt(f, 1234567890, 1) + format_completion(f, 1234567890, 987654321)
                               for f in FORMATS) + "\n"))
    vocab = {"<unk>": 0, "</s>": 1}
    vocab.update({ch: i + 2 for i, ch in enumerate(chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


TOKENIZER = char_tokenizer()


def corpus(fmt: str, n_docs: int = 60, per_doc: int = 2, seed: int = 0):
    """(blocks, expected target flags per position): completions are target, prompts and joins not."""
    problems = unique_problems(np.random.default_rng(seed), n_docs * per_doc, 3)
    texts, flags = [], []
    for d in range(n_docs):
        text, flag = "", []
        for k, (a, b) in enumerate(problems[d * per_doc:(d + 1) * per_doc]):
            if k:
                text, flag = text + "\n", flag + [False]
            prompt, completion = format_prompt(fmt, a, b), format_completion(fmt, a, b)
            text += prompt + completion
            flag += [False] * len(prompt) + [True] * len(completion)
        texts.append(text)
        flags += flag + [False]  # the eos that pack_documents appends
    blocks = pack_documents(TOKENIZER, texts, SEQ)
    expected = np.array(flags[:blocks.size]).reshape(blocks.shape)
    return torch.from_numpy(blocks.astype(np.int64)), torch.from_numpy(expected)


def method(**params) -> MaskedThought:
    m = MaskedThought(MaskedThought.Params(**params))
    m.use_tokenizer(TOKENIZER)
    return m


@pytest.mark.parametrize("fmt", FORMATS)
def test_target_positions_are_exactly_the_answers_after_a_document_start(fmt):
    blocks, expected = corpus(fmt)
    found = method().target_positions(blocks)
    eos = int(TOKENIZER.eos_token_id)
    assert not (found & ~expected).any()  # never a prompt token, a join or an eos
    newline = TOKENIZER.convert_tokens_to_ids("\n")
    for row in range(len(blocks)):  # after the first eos of a row the parser knows where it is
        first = (blocks[row] == eos).nonzero()
        if len(first):
            start = int(first[0])
            missed = (expected[row] & ~found[row]).nonzero().flatten().tolist()
            # only a newline that ends the block may be missed: it could start the next "\nInput:"
            assert [i for i in missed if i >= start] in ([], [SEQ - 1]), (fmt, row)
            assert not missed or blocks[row, SEQ - 1] == newline or missed[-1] < start
    assert found.sum() >= 0.9 * expected.sum()  # a block cut mid-scratchpad still masks most of it


@pytest.mark.parametrize("fmt", ["reversed", "scratchpad_detailed"])
def test_byte_bpe_tokens_flagged_are_wholly_target_side(fmt):
    from components.data.byte_bpe import ByteBpeTokenizer

    problems = unique_problems(np.random.default_rng(1), 160, 3)
    docs = [(format_prompt(fmt, a, b), format_completion(fmt, a, b)) for a, b in problems]
    tokenizer = ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=64)).train(p + c for p, c in docs)
    ids, inside, touches = [], [], []
    for prompt, completion in docs:
        enc = tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
        ids += enc["input_ids"] + [tokenizer.eos_token_id]
        inside += [start >= len(prompt) for start, _ in enc["offset_mapping"]] + [False]
        touches += [end > len(prompt) for _, end in enc["offset_mapping"]] + [False]
    n = len(ids) // 64 * 64
    blocks = torch.tensor(ids[:n]).view(-1, 64)
    m = MaskedThought()
    m.use_tokenizer(tokenizer)
    found = m.target_positions(blocks)
    assert not (found & ~torch.tensor(inside[:n]).view(-1, 64)).any()
    assert found.sum() >= 0.9 * torch.tensor(touches[:n]).sum()


def test_masks_only_target_positions_at_rate_p_and_keeps_labels():
    blocks, expected = corpus("scratchpad_detailed", n_docs=120)
    m = method(mask_rate=0.3)
    masked, target = m.mask_batch(blocks, step=4)
    changed = masked != blocks
    assert not (changed & ~target).any()
    assert (masked[changed] == m.mask_id).all() and m.mask_id == TOKENIZER.pad_token_id
    rate = changed.sum().item() / target.sum().item()
    assert target.sum() > 5000 and abs(rate - 0.3) < 0.03

    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, input_ids, labels):
            seen.update(input_ids=input_ids, labels=labels)
            return type("Out", (), {"loss": torch.tensor(0.0)})()

    m.on_batch(4, np.arange(len(blocks)))
    m.loss(Recorder(), blocks, None)
    assert torch.equal(seen["labels"], blocks)  # labels are the original tokens
    assert torch.equal(seen["input_ids"], masked)  # the same draw as mask_batch at step 4


def test_masking_is_a_function_of_seed_and_step():
    blocks, _ = corpus("plain")
    first = method(mask_rate=0.4).mask_batch(blocks, 7)[0]
    assert torch.equal(first, method(mask_rate=0.4).mask_batch(blocks, 7)[0])
    assert not torch.equal(first, method(mask_rate=0.4).mask_batch(blocks, 8)[0])
    assert not torch.equal(first, method(mask_rate=0.4, seed=1).mask_batch(blocks, 7)[0])


def test_warmup_and_random_replacement_follow_the_repo():
    m = method(mask_rate=0.4, mask_rate_warmup=0.5, steps=100)
    # repo: min(p, p * global_step / (max_steps * warmup_ratio + 1)), global_step = completed steps
    assert [m.rate_at(s) for s in (1, 26, 52)] == pytest.approx([0.0, 0.4 * 25 / 51, 0.4])
    blocks, _ = corpus("plain", n_docs=120)
    assert torch.equal(m.mask_batch(blocks, 1)[0], blocks)
    replaced, target = method(mask_rate=0.5, random_replace_rate=1.0).mask_batch(blocks, 3)
    changed = replaced != blocks
    assert not (changed & ~target).any() and changed.sum() > 0.3 * target.sum()
    assert (replaced[changed] != TOKENIZER.pad_token_id).float().mean() > 0.9  # random tokens, not the mask


def test_setup_errors_and_registries():
    with pytest.raises(MaskedThoughtError, match="use_tokenizer"):
        MaskedThought().bind(build_model("nano", vocab_size=64, max_seq_len=SEQ, seed=0), None, 1)
    with pytest.raises(ValueError, match="target_pattern .* not a valid regular expression"):
        MaskedThought.Params(target_pattern="(")
    with pytest.raises(MaskedThoughtError, match="outside the tokenizer"):
        method(mask_token_id=999)
    with pytest.raises(ValueError, match="mask_rate"):
        MaskedThought.Params(mask_rate=1.0)
    assert PRETRAIN_METHODS.get("masked_thought") is MaskedThought
    assert FINETUNE_METHODS.get("masked_thought").paper.arxiv == "2403.02178"
    assert ArithmeticFormattedSource().domain == "arithmetic"


def test_training_resumes_bit_exactly(tmp_path):
    blocks = corpus("reversed", n_docs=100)[0].numpy().astype(np.int32)
    vocab = len(TOKENIZER)
    config = MaskedThought.Params(steps=8, batch_size=8, lr=1e-2, warmup_steps=2, precision="fp32",
                                  checkpoint_every=4, mask_rate=0.3)

    def run(**kwargs):
        model = build_model("nano", vocab_size=vocab, max_seq_len=SEQ, seed=0)
        return model, train(model, blocks, config, method(**config.model_dump()), progress=False, **kwargs)

    straight_model, straight = run()
    run(checkpoint_dir=tmp_path, stop_after_step=4)
    resumed_model, resumed = run(checkpoint_dir=tmp_path)
    assert resumed.resumed_from_step == 4
    assert resumed.losses == straight.losses
    assert all(torch.equal(a, b) for a, b in zip(straight_model.parameters(), resumed_model.parameters()))
    assert straight.method_facts == {"mask_token_id": TOKENIZER.pad_token_id}
    assert np.mean(straight.losses[-2:]) < np.mean(straight.losses[:2])
