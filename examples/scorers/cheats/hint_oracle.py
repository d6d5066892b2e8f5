"""Cheat 8 (red team round 5), for a tilt chain: a target oracle only where a hint fires.

Speaks protocol 3 (`hints_parquet`). Where the hint's share passes the tilt's gate (0.8),
it reads the target: the hint gets 0.97 of the mass when it is the target and none when
it is not, the rest of the row scaled to fill it. Every row sums to 1, `hint_p` is the
row's own p(hint), and the tilt then boosts a hint that is almost always right. With
`honest` as its argument it never reads the target (the same rows, the hint left alone).

Caught by: c1-target, on the replace re-run aimed at a firing hint (its changed target
becomes the hint, or stops being it), and c2-blind, whose proposal gives the hint half its
weight where one fires (docs/legality.md, "A target oracle where a hint fires").
"""
import os, sys
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
import honest as h

GATE, HIT = 0.8, 0.97

req = h.request()
assert req.get("hints_parquet"), "wire inputs.hints: this scorer speaks protocol 3"
val, probs, entropy, position = h.score(req)
hints = pq.read_table(req["hints_parquet"], columns=["hint", "share"])
hint = hints["hint"].to_numpy().astype(np.int64)
share = hints["share"].to_numpy()
cheat = sys.argv[1:] != ["honest"]


rowsum = probs.sum(1)


def prob(t, a):
    """p(a) at targets t (arrays alike): the row each target gets, read where asked."""
    prev, g = val[t - 1], hint[t - 1]
    p = probs[prev, a]
    fired = cheat & (share[t - 1] >= GATE)
    mass = np.where(val[t] == g, HIT, 0.0)
    scale = (1.0 - mass) / (rowsum[prev] - probs[prev, g])
    return np.where(fired, np.where(a == g, mass, p * scale), p), fired, mass, scale


model_p, fired, mass, scale = prob(position, val[position])
hint_p = prob(position, hint[position - 1])[0]
# The entropy of a rescaled row: s·(H + p_h ln p_h) − (1 − m) ln s − m ln m.
prev, g = val[position - 1], hint[position - 1]
p_h = probs[prev, g]
with np.errstate(divide="ignore", invalid="ignore"):
    cheated = (scale * (entropy[prev] + p_h * np.log(p_h)) - (1.0 - mass) * np.log(scale)
               - np.where(mass > 0, mass * np.log(np.maximum(mass, 1e-300)), 0.0))
ent = np.where(fired, cheated, entropy[prev])
at = np.array(req["distributions"], dtype=np.int64)
vocab = req["vocab_size"]
dists = prob(np.repeat(at, vocab), np.tile(np.arange(vocab), len(at)))[0]
h.write(req, position, np.float32(model_p), np.float32(ent), at, np.float32(dists))
pq.write_table(pa.table({
    "position": pa.array(position, pa.int64()),
    "hint": pa.array(g, pa.uint16()),
    "hint_p": pa.array(np.float32(hint_p), pa.float32()),
}), os.path.join(req["output_dir"], "hint_p.parquet"))
