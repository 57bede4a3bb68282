"""Sharded parquet storage for document tables, validated on write and on read."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.data.schema import DataValidationError, validate_documents

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
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise FileNotFoundError(f"document directory {in_dir} does not exist")
    shards = sorted(in_dir.glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"document directory {in_dir} has no {SHARD_GLOB} shards")
    frames = []
    for shard in shards:
        try:
            frame = pq.read_table(shard).to_pandas()
        except (pa.ArrowException, OSError) as err:
            raise DataValidationError(f"{shard}: not a readable parquet file ({err})") from None
        frames.append(validate_documents(frame, where=str(shard)))
    docs = pd.concat(frames, ignore_index=True)
    return validate_documents(docs, where=str(in_dir))  # ids must be unique across shards too
