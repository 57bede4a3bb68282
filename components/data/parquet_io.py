"""Sharded parquet storage for document tables, validated on write and on read."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.data.schema import DOCUMENT_COLUMNS, DataValidationError, validate_documents

SHARD_GLOB = "part-*.parquet"


def write_documents(df: pd.DataFrame, out_dir: Path, rows_per_shard: int = 5000) -> list[str]:
    """Validate ``df`` and write it as ``out_dir/part-00000.parquet``...; return the shard file names.

    Stale shards from an earlier write are removed first so a re-run never mixes tables.
    An empty table still gets one (empty) shard so it can be read back.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out_dir = Path(out_dir)
    validate_documents(df, where=f"documents to write to {out_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(SHARD_GLOB):
        stale.unlink()
    frame = df.reset_index(drop=True)
    names = []
    starts = range(0, max(len(frame), 1), rows_per_shard)
    for shard_index, start in enumerate(starts):
        name = f"part-{shard_index:05d}.parquet"
        table = pa.Table.from_pandas(frame.iloc[start : start + rows_per_shard], preserve_index=False)
        pq.write_table(table, out_dir / name)
        names.append(name)
    return names


def read_documents(in_dir: Path) -> pd.DataFrame:
    """Read every shard of ``in_dir`` in name order, validating each shard and the whole table."""
    docs = pd.concat([read_shard(shard) for shard in document_shards(in_dir)], ignore_index=True)
    return validate_documents(docs, where=str(in_dir))  # ids must be unique across shards too


def document_shards(in_dir: Path) -> list[Path]:
    """The shard files of a document directory, in name order."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"document directory {in_dir} does not exist")
    shards = sorted(in_dir.glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"document directory {in_dir} has no {SHARD_GLOB} shards")
    return shards


def read_shard(shard: Path) -> pd.DataFrame:
    """One validated shard (ids are unique within it; across shards see ``read_documents``)."""
    try:
        frame = pq.read_table(shard).to_pandas()
    except (pa.ArrowException, OSError) as err:
        raise DataValidationError(f"{shard}: not a readable parquet file ({err})") from None
    return validate_documents(frame, where=str(shard))


class ShardWriter:
    """Writes a document table one piece at a time as ``part-NNNNN.parquet`` shards.

    Memory holds at most one piece; ids are checked unique across everything written.
    ``close()`` returns the shard names; a table with no rows still gets one empty shard.
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(SHARD_GLOB):
            stale.unlink()
        self.names: list[str] = []
        self._ids: set[str] = set()
        self._empty: pd.DataFrame | None = None

    def write(self, frame: pd.DataFrame) -> None:
        frame = validate_documents(frame.reset_index(drop=True), where=f"documents to write to {self.out_dir}")
        if frame.empty:
            self._empty = frame if self._empty is None else self._empty
            return
        clash = self._ids.intersection(frame["id"])
        if clash:
            raise DataValidationError(f"documents to write to {self.out_dir}: duplicate ids across shards, e.g. "
                                      f"{sorted(clash)[:3]}")
        self._ids.update(frame["id"])
        name = f"part-{len(self.names):05d}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), self.out_dir / name)
        self.names.append(name)

    def close(self) -> list[str]:
        if not self.names:
            empty = self._empty if self._empty is not None else pd.DataFrame({c: pd.Series(dtype=str) for c in DOCUMENT_COLUMNS})
            write_documents(empty, self.out_dir)
            self.names = ["part-00000.parquet"]
        return self.names
