import numpy as np
import pytest
import torch

from components.data.byte_bpe import ByteBpeTokenizer
from components.data.prox import Guards, ProX, execute_program, parse_program
from components.data.prox_programs import (_FUNCTION_WORDS, ModelPrograms, ModelSourceParams, RuleBasedParams,
                                           RuleBasedPrograms)
from components.data.registry import SELECTORS
from components.data.schema import validate_documents
from components.data.selector import ReferenceModel, SelectionContext, SelectionError
from components.model.presets import build_model

# 10 lines of 8 words: 80 words
LINES = [f"line {i} has some plain words in it" for i in range(10)]
DOC = "\n".join(LINES)
PROSE = [
    "The interpreter reads the source file and turns it into tokens.",
    "Each token is then handed to the parser, which builds a tree.",
    "The compiler walks that tree and emits bytecode for the virtual machine.",
    "At run time the evaluation loop executes the bytecode one instruction at a time.",
    "Names are looked up in the local scope first, then in the enclosing ones.",
    "If a name is not found anywhere, the interpreter raises a NameError.",
]


def context(**kw):
    return SelectionContext(stage="test", seed=0, **kw)


# ----------------------------------------------------------------------------- executor


def test_remove_lines_is_zero_based_and_inclusive():
    result = execute_program(DOC, "keep_doc()\nremove_lines(line_start=2, line_end=4)")
    assert result.outcome == "edited" and result.lines_removed == 3
    assert result.text == "\n".join(LINES[:2] + LINES[5:])


def test_overlapping_ranges_merge_and_all_removes_everything():
    result = execute_program(DOC, "remove_lines(line_start=0, line_end=1)\nremove_lines(line_start=1, line_end=2)")
    assert result.text == "\n".join(LINES[3:]) and result.lines_removed == 3 and result.failures == 0
    assert execute_program(DOC, "remove_lines(all=True)").outcome == "dropped_little_left"


def test_normalize_replaces_everywhere_before_lines_are_removed():
    program = 'normalize(source_str="plain", target_str="PLAIN")\nremove_lines(line_start=0, line_end=0)'
    result = execute_program(DOC, program)
    assert result.text == "\n".join(line.replace("plain", "PLAIN") for line in LINES[1:])
    assert result.normalizations == 1
    # target_str omitted = delete; quoted commas and single quotes parse (ast, not a comma split)
    text = "alpha, beta and gamma " * 8
    result = execute_program(text, "normalize(source_str='alpha, beta')")
    assert result.text == " and gamma " * 8 and result.normalizations == 1
    # a source of "" or " " changes nothing (reference), and is not a failure
    result = execute_program(DOC, 'normalize(source_str=" ", target_str="_")')
    assert result.text == DOC and result.outcome == "unchanged" and result.failures == 0


def test_doc_level_calls():
    assert execute_program(DOC, "drop_doc()").text is None
    assert execute_program(DOC, "drop_doc()").outcome == "dropped_doc"
    assert execute_program(DOC, "keep_doc()\nskip()").text == DOC
    # drop wins over keep and over chunk calls
    assert execute_program(DOC, "keep_doc()\nremove_lines(line_start=0, line_end=0)\ndrop_doc()").text is None


def test_guards_drop_short_and_nearly_empty_results():
    # 10 words left -> dropped (the FineWeb rule); 11 words left -> kept
    short = "\n".join(["one two three four five", "six seven eight nine ten", "eleven", "x " * 40])
    assert execute_program(short, "remove_lines(line_start=2, line_end=3)").outcome == "dropped_short"
    kept = execute_program(short, "remove_lines(line_start=3, line_end=3)")
    assert kept.outcome == "edited" and kept.text.split() == short.split()[:11]
    # <= 5% of the words left (with a valid program) -> dropped even if more than 10 words remain
    long_doc = "\n".join(["w " * 12] + ["filler words here " * 10] * 10)  # 12 + 300 words
    result = execute_program(long_doc, "remove_lines(line_start=1, line_end=10)")
    assert result.outcome == "dropped_little_left"
    # the guard thresholds are params
    assert execute_program(long_doc, "remove_lines(line_start=1, line_end=10)",
                           Guards(max_removed_word_fraction=0.99)).outcome == "edited"


def test_two_failed_calls_keep_the_original_text():
    one_bad = "remove_lines(line_start=1, line_end=1)\nremove_lines(line_start=oops, line_end=2)"
    two_bad = one_bad + "\nnormalize(source_str=3)"
    result = execute_program(DOC, one_bad)
    assert result.outcome == "edited" and result.failures == 1 and result.text == "\n".join(LINES[:1] + LINES[2:])
    result = execute_program(DOC, two_bad)
    assert result.outcome == "reverted" and result.failures == 2 and result.text == DOC
    # with >= 2 failures the "little left" drop no longer applies, the original text comes back
    long_doc = "\n".join(["w " * 12] + ["filler words here " * 10] * 10)
    result = execute_program(long_doc, "remove_lines(line_start=1, line_end=10)\nremove_lines(x)\nnormalize()")
    assert result.outcome == "reverted" and result.text == long_doc


@pytest.mark.parametrize("line", [
    "remove_lines(line_start=1, line_end=)",       # syntax error
    "remove_lines(1, 2)",                          # positional
    "remove_lines(line_start=1)",                  # missing keyword
    "remove_lines(line_start=4, line_end=2)",      # reversed
    "remove_lines(line_start=-1, line_end=2)",     # negative
    "remove_lines(line_start=1.0, line_end=2)",    # not an int
    "remove_lines(line_start=True, line_end=2)",   # bool is not an int
    "normalize(target_str='x')",                   # missing source
    "normalize(source_str='a', target='b')",       # unknown keyword
    "normalize(source_str='a\\nb', target_str='c')",  # would renumber lines
    "normalize(source_str=__import__('os').getcwd())",  # never evaluated
    "drop_doc(",                                   # does not parse: not a drop
    "keep_doc(now=True)",
    "remove_lines(line_start=1, line_end=1) + 1",  # not a single call
])
def test_malformed_calls_are_counted_failures(line):
    parsed = parse_program(line)
    assert parsed.calls == [] and len(parsed.failures) == 1, parsed
    result = execute_program(DOC, line)
    assert result.text == DOC and result.failures == 1


def test_unknown_lines_are_ignored_and_out_of_range_lines_fail():
    parsed = parse_program("Sure! Here is the program:\n\nskip()\nos.system('rm -rf /')\n__import__('os')")
    assert [c.name for c in parsed.calls] == ["skip"] and parsed.ignored_lines == 3 and not parsed.failures
    result = execute_program(DOC, "remove_lines(line_start=10, line_end=12)")  # DOC has lines 0..9
    assert result.failures == 1 and result.text == DOC
    result = execute_program(DOC, "remove_lines(line_start=8, line_end=12)")  # clipped to 8..9, still a failure
    assert result.failures == 1 and result.text == "\n".join(LINES[:8])


# ----------------------------------------------------------------------------- rule-based programs

BOILERPLATE = [
    "Accept all cookies | Reject non-essential cookies | Manage cookie preferences",
    "Copyright (c) 2019 Globex. All rights reserved.",
    "Subscribe to our newsletter for the latest updates and offers.",
    "Terms of Service | Privacy Policy | Cookie Policy",
    "@@ ## $$ %% ^^ && ** ~~",
]


def test_rule_based_programs_remove_exactly_the_injected_lines(make_docs):
    rng = np.random.default_rng(0)
    texts, clean_texts, injected = [], [], []
    for k in range(4):
        lines = list(PROSE)
        clean_texts.append("\n".join(lines))
        positions = sorted(rng.choice(len(lines) + 3, size=3, replace=False))
        for pos in positions:
            lines.insert(int(pos), BOILERPLATE[(k + int(pos)) % len(BOILERPLATE)])
        injected.append(positions)
        texts.append("\n".join(lines))
    source = RuleBasedPrograms(RuleBasedParams())
    for text, positions in zip(texts, injected):
        program = source.program(text)
        removed = {i for call in parse_program(program).calls if call.name == "remove_lines"
                   for i in range(call.kwargs["line_start"], call.kwargs["line_end"] + 1)}
        assert removed == {int(p) for p in positions}
    prox = ProX()
    out = prox.transform(make_docs(texts).drop(columns="noise_label"), context())
    assert out["text"].tolist() == clean_texts
    assert prox.facts["prox_lines_removed"] == 12 and prox.facts["prox_docs_edited"] == 4
    assert prox.facts["prox_failed_calls"] == 0


def test_rule_based_programs_drop_gibberish_and_repeats_but_leave_code_and_tables(make_docs):
    rng = np.random.default_rng(1)
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789@#$%^&*~_+=<>/\\|{}")
    random_chars = " ".join("".join(rng.choice(chars, size=int(rng.integers(3, 12)))) for _ in range(80))
    # a salad drawn from a large vocabulary almost never hits a function word: leave them out of this small one
    vocabulary = sorted({w.strip(".,").lower() for line in PROSE for w in line.split()} - _FUNCTION_WORDS)
    salad = " ".join(rng.choice(vocabulary, size=80))
    spam = "\n".join(["cheap flights hotels and car rental deals"] * 20)
    code = "\n".join(["def walk(nodes):", "    i = 0", "    total = 0", "    while i < len(nodes):",
                      "        total += nodes[i].size", "        i += 1", "    for node in nodes:",
                      "        i += 1", "    return total, i  # count and size"])
    table = "\n".join(["+-----------+-----------+", "| Operation | Result    |", "+===========+===========+",
                       "| x + y     | the sum of x and y |", "+-----------+-----------+"] + PROSE)
    texts = [random_chars, salad, spam, code, table, "\n".join(PROSE)]
    prox = ProX()
    docs = make_docs(texts)
    out = prox.transform(docs, context())
    assert out["id"].tolist() == docs["id"].tolist()[3:]
    assert out["text"].tolist() == texts[3:]  # code, table and prose untouched
    assert prox.facts["prox_docs_dropped_doc"] == 2  # the two gibberish docs
    assert prox.facts["prox_docs_dropped_little_left"] == 1  # spam: repeats removed, 7 words left of 140
    validate_documents(out, "prox output")


def test_normalize_rule_and_domains_param(make_docs):
    text = "\n".join(PROSE).replace(" ", "\u00a0", 3)
    docs = make_docs([text, "1+2=3\n4+5=9"], domain=["prose", "arithmetic"])
    prox = ProX(ProX.Params(domains=["prose"], keep_programs=True))
    out = prox.transform(docs, context())
    assert out["text"].tolist() == ["\n".join(PROSE), "1+2=3\n4+5=9"]  # arithmetic untouched by the guards
    assert prox.facts["prox_normalizations"] == 1 and prox.facts["prox_docs_refined"] == 1
    assert out["prox_program"].tolist()[0].startswith("keep_doc()\nnormalize(source_str='\\xa0', target_str=' ')")
    assert out["prox_program"].isna().tolist() == [False, True]
    # without the domain restriction the 10-word guard drops the short arithmetic doc (paper behaviour)
    assert len(ProX().transform(docs, context())) == 1
    with pytest.raises(SelectionError, match=r"\['code'\].*present: arithmetic, prose"):
        ProX(ProX.Params(domains=["code"])).transform(docs, context())


def test_registry_and_needs():
    assert SELECTORS.get("prox") is ProX
    assert ProX().min_references == 0 and not ProX().needs_tokenizer
    model_prox = ProX(ProX.Params(source="model"))
    assert model_prox.min_references == 1 and model_prox.needs_tokenizer
    with pytest.raises(ValueError, match="source"):
        ProX.Params(source="llm")


# ----------------------------------------------------------------------------- model programs

DOC_A = "\n".join(PROSE[:3] + ["zzz qqq vvv"])
DOC_B = "\n".join(PROSE[3:] + ["Share on Facebook | Share on Twitter"])


@pytest.fixture(scope="module")
def tokenizer():
    texts = PROSE + [DOC_A, DOC_B, "drop_doc() keep_doc() remove_lines(line_start=1, line_end=1) [doc] [/doc]"] * 3
    return ByteBpeTokenizer(ByteBpeTokenizer.Params(vocab_size=400, seq_len=256)).train(texts)


def _train(model, sequences, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    width = max(len(s) for s in sequences)
    ids = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (seq, n_prompt) in enumerate(zip(sequences, [s.n_prompt for s in sequences])):
        ids[row, : len(seq)] = torch.tensor(list(seq))
        labels[row, n_prompt : len(seq)] = torch.tensor(list(seq)[n_prompt:])  # learn the program only
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


class _Seq(list):
    n_prompt = 0


def test_model_source_prompts_follow_the_reference_format(tokenizer):
    source = ModelPrograms(ModelSourceParams(chunk_tokens=30, chunk_max_new_tokens=16))
    prompts = source.chunk_prompts(tokenizer, DOC_B, max_positions=256)
    decoded = [tokenizer.decode(p) for p in prompts]
    assert len(decoded) > 1  # 30-token chunks split the document
    assert all(d.startswith("You are a helpful, respectful and honest assistant.\n\n[doc]\n[") for d in decoded)
    assert all(d.endswith("\n[/doc]\n") for d in decoded)
    body = "\n".join(d.split("[doc]\n")[1].split("\n[/doc]")[0] for d in decoded)
    assert body == "\n".join(f"[{i:03d}]{line}" for i, line in enumerate(DOC_B.split("\n")))  # global numbering
    with pytest.raises(SelectionError, match="chunk_max_new_tokens=256"):
        ModelPrograms(ModelSourceParams()).chunk_prompts(tokenizer, DOC_B, max_positions=256)


def test_model_source_generates_and_executes_programs(tokenizer, make_docs):
    """A nano model taught three programs writes them through generate, and ProX executes them."""
    eos = tokenizer.eos_token_id
    n_last = len(DOC_B.split("\n")) - 1
    chunk_program = f"remove_lines(line_start={n_last}, line_end={n_last})"
    room = len(tokenizer.backend_tokenizer.encode(chunk_program, add_special_tokens=False).ids) + 2
    params = ModelSourceParams(doc_max_new_tokens=8, chunk_max_new_tokens=room)
    source = ModelPrograms(params)

    def seq(prompt, program):
        s = _Seq(prompt + tokenizer.backend_tokenizer.encode(program, add_special_tokens=False).ids + [eos])
        s.n_prompt = len(prompt)
        return s

    doc_a, doc_b = source.doc_prompts(tokenizer, [DOC_A, DOC_B], 256)
    (chunk_b,) = source.chunk_prompts(tokenizer, DOC_B, 256)
    sequences = [seq(doc_a, "drop_doc()"), seq(doc_b, "keep_doc()"), seq(chunk_b, chunk_program)]
    model = build_model("nano", len(tokenizer), 256, seed=0)
    assert _train(model, sequences, steps=100) < 0.05

    prox = ProX(ProX.Params(source="model", model=params))
    refs = [ReferenceModel("ref", model)]
    out = prox.transform(make_docs([DOC_A, DOC_B]), context(tokenizer=tokenizer, references=refs))
    assert out["id"].tolist() == ["doc-0001"]
    assert out["text"].tolist() == ["\n".join(PROSE[3:])]  # the share line removed
    assert prox.facts["prox_model_doc_drops"] == 1 and prox.facts["prox_model_chunks"] == 1
    assert prox.facts["prox_lines_removed"] == 1


def test_model_source_with_an_untrained_model_changes_little(tokenizer, make_docs):
    model = build_model("nano", len(tokenizer), 256, seed=0).eval()
    params = ModelSourceParams(doc_max_new_tokens=4, chunk_max_new_tokens=12)
    prox = ProX(ProX.Params(source="model", model=params))
    ctx = context(tokenizer=tokenizer, references=[ReferenceModel("ref", model)])
    out = prox.transform(make_docs([DOC_A, DOC_B]), ctx)
    # garbage programs: ignored lines, no crash; the documents pass through unchanged
    assert out["text"].tolist() == [DOC_A, DOC_B]
    assert prox.facts["prox_model_generated_tokens"] > 0
    with pytest.raises(SelectionError, match="reference"):
        ProX(ProX.Params(source="model", model=params)).transform(make_docs([DOC_A]), context(tokenizer=tokenizer))
    with pytest.raises(SelectionError, match=r"'other' is not among the `reference` inputs \(ref\)"):
        ProX(ProX.Params(source="model", model=ModelSourceParams(reference="other"))).transform(make_docs([DOC_A]), ctx)
