"""Cheat 6, a leak kept away from where the cuts used to be: the two-pass bigram leak
everywhere except within 2% of the stream around 30% and 70% (the old, predictable cut
positions), honest there.

Caught by: c1-prefix, because the cuts are secret and fall anywhere in 5%–95%.
"""
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
leak, _ = h.bigram(val, req["vocab_size"])
mixed = 0.5 * probs + 0.5 * leak
share = position / len(val)
near = (np.abs(share - 0.3) < 0.02) | (np.abs(share - 0.7) < 0.02)
previous, target = val[position - 1], val[position]
model_p = np.where(near, probs[previous, target], mixed[previous, target])
ent_mixed = -(mixed * np.log(mixed)).sum(1)
ent = np.where(near, entropy[previous], ent_mixed[previous])
at = np.array(req["distributions"], dtype=np.int64)
near_at = (np.abs(at / len(val) - 0.3) < 0.02) | (np.abs(at / len(val) - 0.7) < 0.02)
dists = np.where(near_at[:, None], probs[val[at - 1]], mixed[val[at - 1]])
h.write(req, position, model_p, ent, at, dists)
