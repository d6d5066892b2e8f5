"""A deliberately leaky scorer: the probes must catch it (docs/legality.md).

It blends the train bigram with a *two-pass* bigram cache: the val stream's own
(previous, next) counts, taken over the whole stream before anything is scored, the
pattern of the n-gram submissions the challenge's organisers ruled out. Every
distribution it writes sums to 1 (C2 passes), yet each score has seen the future: the
count behind p(x_t) includes x_t itself and everything after it, so its BPB is far
better than the model's and C1 fails, in both probes.
    params.command = [".venv/bin/python", "examples/scorers/leaky_cache.py"]
"""
import json, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq

request = json.load(sys.stdin)
vocab = request["vocab_size"]
read = lambda path: pq.read_table(path, columns=["token"])["token"].to_numpy().astype(np.int64)
train, val = read(request["train_parquet"]), read(request["val_parquet"])


def bigram(tokens, add_k):
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (tokens[:-1], tokens[1:]), 1)
    return (counts + add_k) / (counts + add_k).sum(1, keepdims=True)


# The leak: the val stream's counts, all of it, before scoring.
probs = 0.5 * bigram(train, 0.1) + 0.5 * bigram(val, 1e-3)
position = np.arange(request["score_first"], request["score_last"] + 1)
rows = probs[val[position - 1]]
out = request["output_dir"]
pq.write_table(pa.table({
    "position": pa.array(position, pa.int64()),
    "model_p": pa.array(rows[np.arange(len(position)), val[position]], pa.float32()),
    "entropy": pa.array(-(rows * np.log(rows)).sum(1), pa.float32()),
}), os.path.join(out, "pass1.parquet"))
at = np.array(request["distributions"], dtype=np.int64)
pq.write_table(pa.table({
    "position": pa.array(np.repeat(at, vocab), pa.int64()),
    "candidate": pa.array(np.tile(np.arange(vocab), len(at)), pa.uint16()),
    "model_p": pa.array(probs[val[at - 1]].ravel(), pa.float32()),
}), os.path.join(out, "distributions.parquet"))
