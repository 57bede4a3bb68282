import json

import pandas as pd
import pytest
from pydantic import ValidationError

from components.data.schema import NOISE_KINDS, validate_documents
from components.data.standard_corpus import (
    DataSourceError,
    StandardCorpus,
    _jaccard,
    _shingles,
    stdlib_python_files,
)

SMALL = {
    "sources": [
        {"type": "pydoc_topics", "max_docs": 60},
        {"type": "stdlib_code", "max_files": 10},
        {"type": "arithmetic", "n_docs": 60},
    ],
    "noise": {"boilerplate": 0.05, "gibberish": 0.05, "exact_duplicate": 0.05, "near_duplicate": 0.05, "spam": 0.05},
    "seed": 3,
}


NO_NOISE = {"boilerplate": 0, "gibberish": 0, "exact_duplicate": 0, "near_duplicate": 0, "spam": 0}


def test_arithmetic_only_with_default_noise_explains_near_duplicates():
    with pytest.raises(ValueError, match="data.noise.near_duplicate.*>= 100 words"):
        build({"sources": [{"type": "arithmetic", "n_docs": 40}]})


def build(params: dict) -> pd.DataFrame:
    return StandardCorpus(StandardCorpus.Params(**params)).build()


def test_default_corpus_shape(default_corpus):
    docs = default_corpus
    validate_documents(docs, where="default corpus")
    assert set(docs["domain"]) == {"prose", "code", "arithmetic"}
    for domain, group in docs.groupby("domain"):
        assert set(group["split"]) == {"train", "validation", "test"}, domain
    assert 1.0e6 < docs["text"].str.len().sum() < 5.0e6  # "a few MB at most"
    assert (docs["domain"] == "arithmetic").sum() >= 1500
    assert docs["id"].is_unique


def test_noise_only_in_train_with_expected_counts(default_corpus):
    docs = default_corpus
    noisy = docs[docs["noise_label"] != ""]
    assert set(noisy["split"]) == {"train"}
    assert set(noisy["noise_label"]) == set(NOISE_KINDS)
    n_clean_train = ((docs["noise_label"] == "") & (docs["split"] == "train")).sum()
    assert noisy["noise_label"].value_counts().to_dict() == {k: round(0.04 * n_clean_train) for k in NOISE_KINDS}
    # Ids and sources do not reveal which docs are noise.
    assert not noisy["id"].str.contains("noise").any()
    assert set(noisy["source"]) <= set(docs.loc[docs["noise_label"] == "", "source"])


def test_injected_duplicates_match_their_definition(default_corpus):
    docs = default_corpus
    clean_train = set(docs.loc[(docs["noise_label"] == "") & (docs["split"] == "train"), "text"])
    exact = docs.loc[docs["noise_label"] == "exact_duplicate", "text"]
    assert exact.isin(clean_train).all()
    by_length: dict[int, list[str]] = {}
    for text in clean_train:  # word replacement keeps the word count, so compare like with like
        by_length.setdefault(len(text.split()), []).append(text)
    for text in docs.loc[docs["noise_label"] == "near_duplicate", "text"]:
        assert text not in clean_train
        words = text.split()
        best = max(_jaccard(_shingles(words), _shingles(t.split())) for t in by_length[len(words)])
        assert 0.85 <= best < 1.0


def test_clean_docs_have_no_exact_duplicates(default_corpus):
    clean = default_corpus.loc[default_corpus["noise_label"] == "", "text"].map(lambda t: " ".join(t.split()))
    assert clean.is_unique


def test_deterministic_and_seed_sensitive():
    first, second = build(SMALL), build(SMALL)
    pd.testing.assert_frame_equal(first, second)
    other = build({**SMALL, "seed": 4})
    assert not first["text"].equals(other["text"]) or not first["split"].equals(other["split"])


def test_arithmetic_lines_are_correct():
    docs = build({"sources": [{"type": "arithmetic", "n_docs": 40, "max_digits": 4}], "seed": 1, "noise": NO_NOISE})
    lines = [line for text in docs.loc[docs["noise_label"] == "", "text"] for line in text.splitlines()]
    assert len(lines) >= 40 * 8
    for line in lines:
        left, result = line.split("=")
        op = "+" if "+" in left else "-"
        a, b = (int(x) for x in left.split(op))
        assert max(a, b) < 10**4 and int(result) == (a + b if op == "+" else a - b) >= 0


def test_stdlib_sample_excludes_tests_and_idlelib():
    parts = {part for path in stdlib_python_files() for part in path.parts}
    assert not parts & {"test", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    assert len(stdlib_python_files()) > 150


def test_local_jsonl_and_parquet_sources(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    rows = [{"body": f"jsonl document {i} " * 5, "domain": "web" if i % 2 else "news"} for i in range(12)]
    rows.append({"body": "   ", "domain": "web"})  # blank rows are skipped
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"text": [f"parquet document {i} " * 5 for i in range(9)]}).to_parquet(parquet)
    params = {
        "sources": [
            {"type": "jsonl", "path": str(jsonl), "text_field": "body"},
            {"type": "parquet", "path": str(parquet), "domain": "tables"},
        ],
        "noise": NO_NOISE,
        "split": {"validation": 0.2, "test": 0.2},
    }
    docs = build(params)
    assert docs.groupby("source").size().to_dict() == {"jsonl": 12, "parquet": 9}
    assert set(docs["domain"]) == {"web", "news", "tables"}
    for _, group in docs.groupby("domain"):
        assert set(group["split"]) == {"train", "validation", "test"}
    assert docs["id"].iloc[0] == "jsonl-000000"


def test_missing_local_file_names_path_and_recipe_key(tmp_path):
    missing = tmp_path / "absent.jsonl"
    params = {"sources": [{"type": "arithmetic", "n_docs": 10}, {"type": "jsonl", "path": str(missing)}]}
    with pytest.raises(DataSourceError) as err:
        build(params)
    assert isinstance(err.value, FileNotFoundError)
    assert str(missing) in str(err.value) and "data.sources[1].path" in str(err.value)


def test_hf_source_loads_local_directory(tmp_path):
    data_dir = tmp_path / "hf_local"
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text(
        "\n".join(json.dumps({"content": f"hugging face row {i} " * 4}) for i in range(10)) + "\n"
    )
    params = {
        "sources": [{"type": "hf", "name": str(data_dir), "text_field": "content", "domain": "hf",
                     "max_docs": 8, "cache_dir": str(tmp_path / "cache")}],
        "noise": NO_NOISE,
        "split": {"validation": 0.2, "test": 0.2},
    }
    docs = build(params)
    assert len(docs) == 8 and set(docs["domain"]) == {"hf"}
    assert docs["text"].iloc[0].startswith("hugging face row 0")


def test_hf_source_failure_is_wrapped(tmp_path):
    params = {"sources": [{"type": "hf", "name": str(tmp_path / "no_such_dataset"), "cache_dir": str(tmp_path)}]}
    with pytest.raises(DataSourceError, match=r"(?s)no_such_dataset.*local path"):
        build(params)


def test_params_are_strict():
    with pytest.raises(ValidationError):
        StandardCorpus.Params(sources=[{"type": "wikipedia"}])
    with pytest.raises(ValidationError):
        StandardCorpus.Params(sources=[{"type": "arithmetic", "n_docs": 5, "digits": 3}])
    with pytest.raises(ValidationError):
        StandardCorpus.Params(split={"validation": 0.6, "test": 0.5})


def test_too_few_docs_per_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="domain 'arithmetic' has only 2 documents"):
        build({"sources": [{"type": "arithmetic", "n_docs": 2}], "noise": NO_NOISE})


def test_binary_jsonl_names_the_file_and_line_without_echoing_it(tmp_path):
    bad = tmp_path / "binary.jsonl"
    bad.write_bytes(b'{"text": "fine line"}\n' + b'\x89PNG\r\n\x1a\nSECRET\xff\xfe\n')
    with pytest.raises(ValueError) as err:
        build({"sources": [{"type": "jsonl", "path": str(bad)}], "noise": NO_NOISE})
    message = str(err.value)
    assert f"{bad}:2: not UTF-8 text (byte 0x89" in message and "SECRET" not in message


def test_lone_surrogate_in_jsonl_names_the_file_line_and_field(tmp_path):
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken \\ud800 text"}\n')  # a JSON escape with no pair
    with pytest.raises(ValueError, match=rf"{bad}:2: field 'text' holds an unpaired UTF-16 surrogate"):
        build({"sources": [{"type": "jsonl", "path": str(bad)}], "noise": NO_NOISE})


def test_input_files_name_every_local_file_a_source_reads(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "x"}\n')
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    corpus = StandardCorpus(StandardCorpus.Params(sources=[
        {"type": "pydoc_topics"}, {"type": "stdlib_code"}, {"type": "jsonl", "path": str(jsonl)},
        {"type": "hf", "name": str(hf_dir)}, {"type": "hf", "name": "some/hub-dataset"}, {"type": "arithmetic"}]))
    files = corpus.input_files()
    assert set(files) == {"data.sources[0]", "data.sources[1]", "data.sources[2].path", "data.sources[3].name"}
    assert files["data.sources[0]"][0].name == "topics.py"
    assert files["data.sources[1]"] == list(stdlib_python_files())
    assert files["data.sources[2].path"] == [jsonl] and files["data.sources[3].name"] == [hf_dir]
