"""The opt-in routing trace: every (token, layer, rank) record streamed to Parquet in bounded row groups."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moescope.output import atomic_file


class TraceWriter:
    """Streams routing records to Parquet parts, one row group per `group_rows` rows at most.

    Each checkpoint closes the current part; `finish` concatenates the parts, row group by row group.
    """

    def __init__(self, directory: Path, group_rows: int = 1 << 18):
        import pyarrow as pa

        self.pa, self.directory, self.group_rows = pa, directory, group_rows
        self.schema = pa.schema([("prompt_id", pa.string()), ("domain", pa.string()), ("phase", pa.string()),
                                 ("position", pa.int32()), ("layer", pa.int16()), ("rank", pa.int8()),
                                 ("expert", pa.int16()), ("weight", pa.float32())])
        self.writer = None
        self.buffer: list = []
        self.buffered = 0

    def open_part(self, name: str) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(self.directory / name, self.schema)

    def add(self, batch, phase, rows, positions, layer, ids, weights, layer_index) -> None:
        pa = self.pa
        k = ids.shape[1]
        rows = rows.cpu().numpy().astype(np.int32).repeat(k)

        def strings(index, names):
            return pa.DictionaryArray.from_arrays(pa.array(index), pa.array(names)).dictionary_decode()

        domains = sorted({p.domain for p in batch})
        columns = [
            strings(rows, [p.id for p in batch]),
            strings(np.array([domains.index(p.domain) for p in batch], np.int32)[rows], domains),
            strings(np.zeros(len(rows), np.int32), [phase]),
            pa.array(positions.cpu().numpy().astype(np.int32).repeat(k)),
            pa.array(np.asarray(layer_index, np.int16)[layer.cpu().numpy()].repeat(k)),
            pa.array(np.tile(np.arange(k, dtype=np.int8), len(positions))),
            pa.array(ids.cpu().numpy().astype(np.int16).reshape(-1)),
            pa.array(weights.float().cpu().numpy().reshape(-1)),
        ]
        self.buffer.append(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.buffered += len(rows)
        if self.buffered >= self.group_rows:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.writer.write_table(self.pa.Table.from_batches(self.buffer), row_group_size=self.group_rows)
        self.buffer, self.buffered = [], 0

    def close_part(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        self.writer = None

    def finish(self, parts: list[str], path: Path) -> None:
        import pyarrow.parquet as pq

        self.close_part()
        with atomic_file(path) as tmp, pq.ParquetWriter(tmp, self.schema) as writer:
            for part in parts:
                source = pq.ParquetFile(self.directory / part)
                for group in range(source.num_row_groups):
                    writer.write_table(source.read_row_group(group))


