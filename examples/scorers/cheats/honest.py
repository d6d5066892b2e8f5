"""What every cheat here starts from: the add-k bigram of bigram_numpy.py, as functions.

The cheats (one per file, docs/legality.md "What the probes catch") each change one thing
in it; `tests/cheats.rs` runs them all and checks that a probe fails each, with evidence.
"""
import json, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq


def request():
    return json.load(sys.stdin)


def tokens(path):
    return pq.read_table(path, columns=["token"])["token"].to_numpy().astype(np.int64)


def bigram(stream, vocab, add_k=0.1):
    """p(next | previous) and each row's entropy, from counts over `stream`."""
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (stream[:-1], stream[1:]), 1)
    probs = (counts + add_k) / (counts + add_k).sum(1, keepdims=True)
    return probs, -(probs * np.log(probs)).sum(1)


def score(req):
    """The honest scorer's pieces: (val, probs, entropy, positions scored)."""
    val = tokens(req["val_parquet"])
    probs, entropy = bigram(tokens(req["train_parquet"]), req["vocab_size"])
    position = np.arange(req["score_first"], req["score_last"] + 1)
    return val, probs, entropy, position


def write(req, position, model_p, entropy, at, dists):
    """pass1.parquet, and distributions.parquet with one row per candidate at `at`."""
    out, vocab = req["output_dir"], req["vocab_size"]
    pq.write_table(pa.table({
        "position": pa.array(position, pa.int64()),
        "model_p": pa.array(np.asarray(model_p), pa.float32()),
        "entropy": pa.array(np.asarray(entropy), pa.float32()),
    }), os.path.join(out, "pass1.parquet"))
    at = np.asarray(at, dtype=np.int64)
    pq.write_table(pa.table({
        "position": pa.array(np.repeat(at, vocab), pa.int64()),
        "candidate": pa.array(np.tile(np.arange(vocab), len(at)), pa.uint16()),
        "model_p": pa.array(np.asarray(dists).ravel() if len(at) else [], pa.float32()),
    }), os.path.join(out, "distributions.parquet"))


def honest(req):
    val, probs, entropy, position = score(req)
    at = np.array(req["distributions"], dtype=np.int64)
    write(req, position, probs[val[position - 1], val[position]], entropy[val[position - 1]],
          at, probs[val[at - 1]])
