"""Lee et al. (2023) addition formats: exact text, exact parse back, disjoint held-out problems."""
from __future__ import annotations

import numpy as np
import pytest

from components.data.arithmetic_formats import (
    FORMATS, ArithmeticFormatError, ArithmeticFormattedSource, detect_format, format_completion, format_example,
    format_prompt, formatted_arithmetic_docs, parse_answer, parse_example, split_examples, unique_problems,
)
from components.data.standard_corpus import StandardCorpus


def test_formats_match_the_reference_code_character_for_character():
    # The detailed example is the one printed in lee-ny/teaching_arithmetic's run scripts.
    assert format_example("plain", 128, 367) == "128+367=495"
    assert format_example("reversed", 128, 367) == "$128+367=594$"
    assert format_example("reversed", 50, 50) == "$50+50=001$"  # reversed digits keep the zeros
    assert format_example("scratchpad_simple", 128, 367) == (
        "Input:\n128+367\nTarget:\nA->5 , C->1\nA->9 , C->0\nA->4 , C->0.\n495")
    assert format_example("scratchpad_detailed", 1946, 3598) == (
        "Input:\n1946+3598\nTarget:\n<scratch>\n"
        "[1,9,4,6] has 4 digits.\n[3,5,9,8] has 4 digits.\n"
        "[1,9,4,6] + [3,5,9,8] , A=[] , C=0 , 6+8+0=14 , A->4 , C->1\n"
        "[1,9,4] + [3,5,9] , A=[4] , C=1 , 4+9+1=14 , A->4 , C->1\n"
        "[1,9] + [3,5] , A=[4,4] , C=1 , 9+5+1=15 , A->5 , C->1\n"
        "[1] + [3] , A=[5,4,4] , C=1 , 1+3+1=5 , A->5 , C->0\n"
        "[] + [] , A=[5,5,4,4] C=0 , END\n</scratch>\n5 5 4 4")
    # operands of unequal length pad the shorter one with 0 (the code's list_x[-1] if i < len_x else 0)
    assert format_completion("scratchpad_detailed", 5, 97).splitlines()[3:6] == [
        "[5] + [9,7] , A=[] , C=0 , 5+7+0=12 , A->2 , C->1",
        "[] + [9] , A=[2] , C=1 , 0+9+1=10 , A->0 , C->1",
        "[] + [] , A=[0,2] C=1 , END"]
    assert format_prompt("scratchpad_simple", 1, 2) == "Input:\n1+2\nTarget:\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_problems_round_trip_through_parse_answer(fmt):
    rng = np.random.default_rng(7)
    cases = [(999, 1), (0, 0), (99999, 99999), (5, 995), (10, 90)]  # full carry chains, zeros
    cases += [tuple(int(x) for x in rng.integers(0, 10 ** rng.integers(1, 7), size=2)) for _ in range(300)]
    n_carry = 0
    for a, b in cases:
        text = format_example(fmt, a, b)
        assert parse_answer(fmt, text) == (a, b, a + b)
        assert parse_example(fmt, text) == (a, b)
        assert detect_format(text) == fmt
        # a prompt plus its completion, followed by more text, parses to the first example
        assert parse_answer(fmt, format_prompt(fmt, a, b) + format_completion(fmt, a, b) + "\n" +
                            format_example(fmt, 3, 4)) == (a, b, a + b)
        n_carry += len(str(a + b)) > max(len(str(a)), len(str(b)))
    assert n_carry > 30  # the cases exercise a final carry


@pytest.mark.parametrize("fmt", FORMATS)
def test_wrong_or_malformed_answers_parse_to_a_different_or_no_answer(fmt):
    text = format_example(fmt, 128, 367)
    assert parse_answer(fmt, format_prompt(fmt, 128, 367)).answer is None  # nothing generated
    wrong = {"plain": "128+367=496", "reversed": "$128+367=694$",
             "scratchpad_simple": text[:-3] + "496", "scratchpad_detailed": text[:-5] + "4 9 6"}[fmt]
    assert parse_answer(fmt, wrong) == (128, 367, 496)
    garbled = {"plain": "128+367=0495", "reversed": "$128+367=5940$",  # leading zeros are not canonical
               "scratchpad_simple": text[:-3] + "4x5", "scratchpad_detailed": text[:-5] + "49 5"}[fmt]
    assert parse_answer(fmt, garbled).answer is None
    with pytest.raises(ArithmeticFormatError, match="does not start with"):
        parse_answer(fmt, "hello " + text)
    with pytest.raises(ArithmeticFormatError, match="not a well-formed"):
        parse_example(fmt, wrong)


def test_reversed_answer_may_end_without_its_closing_dollar():
    assert parse_answer("reversed", "$128+367=594").answer == 495
    assert parse_answer("reversed", "$128+367=594\n$1+2=3$").answer == 495


def test_bad_format_and_operands_are_clear_errors():
    with pytest.raises(ArithmeticFormatError, match="unknown arithmetic format 'binary'.*plain"):
        format_example("binary", 1, 2)
    with pytest.raises(ArithmeticFormatError, match="non-negative integers"):
        format_example("plain", -1, 2)
    with pytest.raises(ValueError, match="format"):
        ArithmeticFormattedSource(format="reverse")


@pytest.mark.parametrize("fmt", FORMATS)
def test_documents_hold_distinct_problems_and_split_back(fmt):
    src = ArithmeticFormattedSource(format=fmt, n_docs=200, examples_per_doc=3, max_digits=3, seed=4)
    docs = formatted_arithmetic_docs(src)
    assert len(docs) == 200
    problems = [parse_example(fmt, ex) for doc in docs for ex in split_examples(fmt, doc)]
    assert len(problems) == 600
    assert len({tuple(sorted(p)) for p in problems}) == 600  # no repeat, even with operands swapped
    assert formatted_arithmetic_docs(src) == docs  # seeded
    digits = np.array([len(str(a)) for a, _ in problems])
    assert all(0.25 < (digits == d).mean() < 0.42 for d in (1, 2, 3))  # digit counts about equally likely


def test_too_many_problems_for_the_digit_count_is_an_error():
    with pytest.raises(ValueError, match="distinct problems requested but 1-digit addition has only 55"):
        unique_problems(np.random.default_rng(0), 40, 1)


def test_corpus_split_keeps_held_out_problems_out_of_training():
    params = StandardCorpus.Params(
        sources=[{"type": "arithmetic_formatted", "format": "reversed", "n_docs": 400, "examples_per_doc": 2,
                  "max_digits": 3}],
        noise={"boilerplate": 0, "gibberish": 0, "exact_duplicate": 0, "near_duplicate": 0, "spam": 0},
        split={"validation": 0.1, "test": 0.1}, seed=3)
    docs = StandardCorpus(params).build()
    assert set(docs["domain"]) == {"arithmetic"} and set(docs["source"]) == {"arithmetic_formatted"}
    problems = {split: {tuple(sorted(parse_example("reversed", ex))) for text in group["text"]
                        for ex in split_examples("reversed", text)}
                for split, group in docs.groupby("split")}
    assert {len(v) for v in problems.values()} == {80, 640}  # 40 validation and 40 test documents
    assert not problems["train"] & problems["test"]
    assert not problems["train"] & problems["validation"]
    assert not problems["test"] & problems["validation"]
    again = StandardCorpus(params).build()
    assert again["text"].tolist() == docs["text"].tolist()


def test_find_prompts_skips_a_prompt_cut_at_the_start_of_a_block():
    from components.data.arithmetic_formats import find_prompts

    assert find_prompts("plain", "3+45=48\n12+7=19\n>8+1=9") == {(12, 7), (8, 1)}  # "3+45" may be "23+45" cut
    assert find_prompts("plain", "\nx12+7=19") == set()  # not at a line start: part of other text
    text = "t:\n" + format_example("scratchpad_simple", 12, 7) + "\n" + format_example("scratchpad_simple", 3, 4)
    assert find_prompts("scratchpad_simple", text) == {(12, 7), (3, 4)}
    assert find_prompts("scratchpad_simple", format_example("scratchpad_simple", 12, 7)) == set()
