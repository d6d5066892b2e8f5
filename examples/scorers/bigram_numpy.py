"""An add-k bigram on the train split, tempered, as a cachemoney scorer in numpy.

The same model as `pass1 model = "bigram"`, written as a user would: docs/scorers.md.
    params.command = [".venv/bin/python", "examples/scorers/bigram_numpy.py", "0.85", "0.1"]
"""
import json, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq

request = json.load(sys.stdin)
temperature, add_k = (float(a) for a in sys.argv[1:3])
vocab = request["vocab_size"]
read = lambda path: pq.read_table(path, columns=["token"])["token"].to_numpy().astype(np.int64)
train, val = read(request["train_parquet"]), read(request["val_parquet"])

counts = np.zeros((vocab, vocab))
np.add.at(counts, (train[:-1], train[1:]), 1)
log_p = np.log((counts + add_k) / (counts + add_k).sum(1, keepdims=True)) / temperature
log_p -= np.logaddexp.reduce(log_p, axis=1, keepdims=True)  # renormalise after tempering
probs = np.exp(log_p)
entropy = -(probs * log_p).sum(1)

first, last = request["score_first"], request["score_last"]
position = np.arange(first, last + 1)
out = request["output_dir"]
pq.write_table(pa.table({
    "position": pa.array(position, pa.int64()),
    "model_p": pa.array(probs[val[position - 1], val[position]], pa.float32()),
    "entropy": pa.array(entropy[val[position - 1]], pa.float32()),
}), os.path.join(out, "pass1.parquet"))
at = np.array(request["distributions"], dtype=np.int64)
pq.write_table(pa.table({
    "position": pa.array(np.repeat(at, vocab), pa.int64()),
    "candidate": pa.array(np.tile(np.arange(vocab), len(at)), pa.uint16()),
    "model_p": pa.array(probs[val[at - 1]].ravel(), pa.float32()),
}), os.path.join(out, "distributions.parquet"))
