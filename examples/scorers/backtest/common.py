"""What every backtest scorer shares: the request, the streams, the base model, the writer.

The backtest (docs/backtest.md) writes each evaluation-time technique of the challenge's
later submissions as a small scorer on top of one base model, the add-k bigram of
examples/scorers/bigram_numpy.py at temperature 1, from docs/eval-techniques.md
(our words, not the submissions' code). Each scorer writes, at every position it is asked
about, the distribution it *used* for the realised target: every choice that depends on
the target (a gate, a mixing weight, a vector trained on it) fixed as the realised target
made it. For a legal technique that is the distribution over candidates; for one that
reads its target it moves when the target moves, and its scored values are not the
candidates' own (the probes' c1-target and c2-blind).
"""
import json, os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq

ADD_K = 0.1


def request():
    return json.load(sys.stdin)


def tokens(path):
    return pq.read_table(path, columns=["token"])["token"].to_numpy().astype(np.int64)


def byte_decoder():
    """A byte-level BPE piece's characters back to bytes (the GPT-2 byte alphabet: printable
    bytes stand for themselves, the rest are shifted to code points from 256 up)."""
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, shifted = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Vocab:
    """Each token's canonical bytes (without a SentencePiece leading space), whether it is a
    boundary (control) token, and whether it starts a word."""

    def __init__(self, path):
        table = pq.read_table(path).to_pydict()
        decode = byte_decoder()
        self.size = len(table["id"])
        self.boundary = np.array(table["is_boundary"], dtype=bool)
        self.leading_space = np.array(table["has_leading_space"], dtype=bool)
        self.pieces = []
        for piece, boundary, n in zip(table["piece"], table["is_boundary"], table["base_bytes"]):
            if boundary or n == 0:
                self.pieces.append(b"")
            elif piece.startswith("\u2581"):
                self.pieces.append(piece[1:].encode())
            elif all(c in decode for c in piece):
                self.pieces.append(bytes(decode[c] for c in piece))
            else:
                self.pieces.append(piece.encode())
        self.new_word = np.array(
            [ls or p.startswith(b" ") for ls, p in zip(self.leading_space, self.pieces)])

    def bytes_of(self, token, previous):
        """The target's bytes by the challenge's rule: a space when the piece has a leading
        "▁" and the previous token is not a boundary, then the piece's bytes."""
        space = self.leading_space[token] and not self.boundary[previous]
        return (b" " if space else b"") + self.pieces[token]


class Setup:
    """The request, the val and train streams, and the base bigram p(next | previous)."""

    def __init__(self):
        self.req = request()
        self.vocab_size = self.req["vocab_size"]
        self.val = tokens(self.req["val_parquet"])
        self.doc = pq.read_table(self.req["val_parquet"], columns=["doc"])["doc"].to_numpy()
        self.train = tokens(self.req["train_parquet"])
        self.vocab = Vocab(self.req["vocab_parquet"])
        counts = np.zeros((self.vocab_size, self.vocab_size))
        np.add.at(counts, (self.train[:-1], self.train[1:]), 1)
        self.probs = (counts + ADD_K) / (counts + ADD_K).sum(1, keepdims=True)
        self.log_probs = np.log(self.probs)
        self.position = np.arange(self.req["score_first"], self.req["score_last"] + 1)
        self.asked = np.array(self.req["distributions"], dtype=np.int64)

    def base(self, t):
        """The base model's distribution for the target at position t."""
        return self.probs[self.val[t - 1]]


def entropy(rows):
    rows = np.asarray(rows, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(rows > 0, rows * np.log(rows), 0.0).sum(-1)


def write(req, position, model_p, entropies, at, dists):
    """pass1.parquet, and distributions.parquet with one row per candidate at `at`."""
    out, vocab = req["output_dir"], req["vocab_size"]
    pq.write_table(pa.table({
        "position": pa.array(position, pa.int64()),
        "model_p": pa.array(np.asarray(model_p), pa.float32()),
        "entropy": pa.array(np.asarray(entropies), pa.float32()),
    }), os.path.join(out, "pass1.parquet"))
    at = np.asarray(at, dtype=np.int64)
    dists = np.asarray(dists, dtype=np.float32).reshape(len(at), vocab)
    pq.write_table(pa.table({
        "position": pa.array(np.repeat(at, vocab), pa.int64()),
        "candidate": pa.array(np.tile(np.arange(vocab), len(at)), pa.uint16()),
        "model_p": pa.array(dists.ravel(), pa.float32()),
    }), os.path.join(out, "distributions.parquet"))
