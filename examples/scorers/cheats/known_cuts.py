"""Cheat 8, the cuts worked out in advance (the red team's, after stop 33): a cut falls
just before a position where the original run keeps a distribution, and that sample was
seeded by the pipeline's public `mass_seed`, so a scorer could list every place a cut
may fall. This one reads the next token, p(v) ∝ p(v | previous) · p(next | v) (a real,
normalised, target-independent distribution, just not a causal one), everywhere but at
s − 1 and s for each s of that public sample (`public_sample.json`, which the test writes
from the seed), where it is honest.

Caught by: c1-prefix, because a judged pass-1's sample seed is now mixed with the
judge's secret, so the cuts fall where the scorer peeks.
"""
import json
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
public = np.array(json.load(open("public_sample.json")), dtype=np.int64)
honest_at = np.zeros(len(val) + 1, bool)
honest_at[public] = True
honest_at[public - 1] = True
honest_at[len(val) - 1:] = True  # nothing after the last target to read


def dists(t):
    d = probs[val[t - 1]].copy()
    peek = ~honest_at[t]
    following = val[np.minimum(t + 1, len(val) - 1)]
    d[peek] *= probs[:, following[peek]].T
    return d / d.sum(1, keepdims=True)


model_p, ent = np.empty(len(position)), np.empty(len(position))
for i in range(0, len(position), 4096):
    t = position[i:i + 4096]
    d = dists(t)
    model_p[i:i + 4096] = d[np.arange(len(t)), val[t]]
    ent[i:i + 4096] = -(d * np.log(d)).sum(1)
at = np.array(req["distributions"], dtype=np.int64)
h.write(req, position, model_p, ent, at, dists(at) if len(at) else np.zeros((0, req["vocab_size"])))
