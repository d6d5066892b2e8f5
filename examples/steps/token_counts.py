"""A program as a pipeline step (docs/commands.md, "command"): how often each token
occurs in the val split of the node's `inputs.tokens`.

    [nodes.val_counts]
    stage = "command"
    inputs.tokens = "tokens"
    files.program = ["examples/steps/token_counts.py"]
    params.command = [".venv/bin/python", "examples/steps/token_counts.py"]
    outputs.tables.counts = ["token u16", "count i64"]
    outputs.files = ["summary.json"]

It reads the request named by CACHEMONEY_REQUEST (protocol cachemoney-command/1) and
writes exactly what the node declares into the request's output_dir: the table
`counts.parquet` and the file `summary.json`. cachemoney then checks both against the
declaration and the table becomes queryable as `val_counts.counts`.
"""
import json
import os
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq

request = json.load(open(os.environ["CACHEMONEY_REQUEST"]))
assert request["protocol"] == "cachemoney-command/1", request["protocol"]
val = pq.read_table(request["inputs"]["tokens"]["tables"]["val"], columns=["token"])
counts = Counter(val.column("token").to_pylist())
tokens = sorted(counts)
out = request["output_dir"]
pq.write_table(
    pa.table({
        "token": pa.array(tokens, pa.uint16()),
        "count": pa.array([counts[t] for t in tokens], pa.int64()),
    }),
    os.path.join(out, "counts.parquet"),
)
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"val_tokens": val.num_rows, "distinct": len(tokens)}, f)
print(f"{val.num_rows} val tokens, {len(tokens)} distinct")
