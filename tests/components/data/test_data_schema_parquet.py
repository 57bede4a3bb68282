import pandas as pd
import pytest

from components.data.parquet_io import read_documents, write_documents
from components.data.schema import DataValidationError, validate_documents


def test_valid_table_passes_and_extra_columns_allowed(make_docs):
    docs = make_docs(["one doc", "two doc"], quality=[0.5, 0.7])
    assert validate_documents(docs, where="memory").equals(docs)


@pytest.mark.parametrize(
    "mutate, column",
    [
        (lambda d: d.assign(text=["fine", "   \n"]), "text"),
        (lambda d: d.assign(id=["same", "same"]), "id"),
        (lambda d: d.assign(split=["train", "dev"]), "split"),
        (lambda d: d.assign(noise_label=["", "typo"]), "noise_label"),
        (lambda d: d.drop(columns=["domain"]), "domain"),
    ],
)
def test_schema_rejects_bad_tables_and_names_where(mutate, column, make_docs):
    docs = mutate(make_docs(["a text", "b text"]))
    with pytest.raises(DataValidationError) as err:
        validate_documents(docs, where="data/corpus/part-00003.parquet")
    message = str(err.value)
    assert message.startswith("data/corpus/part-00003.parquet")
    assert column in message
    assert len(message.splitlines()) < 12  # a summary, not the whole failure table


def test_summary_counts_failures_briefly(make_docs):
    docs = make_docs(["x"] * 500, split=["nope"] * 500)
    with pytest.raises(DataValidationError, match=r"column 'split'.*500 value") as err:
        validate_documents(docs, where="here")
    assert len(str(err.value)) < 1000


def test_parquet_round_trip_in_shards(tmp_path, make_docs):
    docs = make_docs([f"text number {i}" for i in range(12)], score=[float(i) for i in range(12)])
    names = write_documents(docs, tmp_path / "out", rows_per_shard=5)
    assert names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    back = read_documents(tmp_path / "out")
    pd.testing.assert_frame_equal(back.astype(object), docs.astype(object))
    # Rewriting with fewer rows removes stale shards.
    assert write_documents(docs.head(3), tmp_path / "out", rows_per_shard=5) == ["part-00000.parquet"]
    assert len(read_documents(tmp_path / "out")) == 3


def test_write_validates_first(tmp_path, make_docs):
    with pytest.raises(DataValidationError, match="out"):
        write_documents(make_docs(["ok", ""]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_or_empty_directory_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_documents(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*no part"):
        read_documents(tmp_path / "empty")


def test_corrupt_parquet_names_file(tmp_path, make_docs):
    write_documents(make_docs(["a", "b"]), tmp_path, rows_per_shard=1)
    (tmp_path / "part-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataValidationError, match="part-00001.parquet"):
        read_documents(tmp_path)


def test_duplicate_ids_across_shards_name_directory(tmp_path, make_docs):
    write_documents(make_docs(["a"]), tmp_path / "one")
    write_documents(make_docs(["b"]), tmp_path / "two")
    (tmp_path / "two" / "part-00000.parquet").rename(tmp_path / "one" / "part-00001.parquet")
    with pytest.raises(DataValidationError, match=r"(?s)one: .*column 'id'"):
        read_documents(tmp_path / "one")
