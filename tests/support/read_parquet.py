"""An independent reader for OrbManager's Parquet files (pyarrow, not the parquet crate).

Usage: read_parquet.py <dir> dataset   -- hive-partitioned spilled telemetry under <dir>
       read_parquet.py <dir> files     -- every *.parquet file under <dir>, unpartitioned
Prints one JSON document: {"rows": N, "schema": {...}, "points": [...]}, times as unix ms.
"""
import json
import pathlib
import sys

import pyarrow as pa
import pyarrow.dataset as ds

root, mode = sys.argv[1], sys.argv[2]
if mode == "dataset":
    part = ds.partitioning(
        pa.schema([("tenant", pa.string()), ("date", pa.string()), ("hour", pa.string())]), flavor="hive"
    )
    dataset = ds.dataset(root, format="parquet", partitioning=part)
else:
    files = sorted(str(p) for p in pathlib.Path(root).rglob("*.parquet"))
    dataset = ds.dataset(files, format="parquet")
table = dataset.to_table()
schema = {f.name: str(f.type) for f in table.schema}
for name in ("ts", "received_at"):
    i = table.schema.get_field_index(name)
    table = table.set_column(i, name, table.column(name).cast(pa.int64()))
points = []
for r in table.to_pylist():
    r["metrics"] = dict(r["metrics"] or [])
    points.append(r)
print(json.dumps({"rows": table.num_rows, "schema": schema, "points": points}))
