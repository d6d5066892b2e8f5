"""Cheat 5, entries counted more than once: the honest table plus 200,000 copies of its
most confident entry, which pulls the average bits per byte down.

Caught by: coverage (each target exactly once), which says how far the copies move BPB.
"""
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
model_p = probs[val[position - 1], val[position]]
ent = entropy[val[position - 1]]
best = int(np.argmax(model_p))
copies = 200_000
position = np.concatenate([position, np.full(copies, position[best])])
model_p = np.concatenate([model_p, np.full(copies, model_p[best])])
ent = np.concatenate([ent, np.full(copies, ent[best])])
at = np.array(req["distributions"], dtype=np.int64)
h.write(req, position, model_p, ent, at, probs[val[at - 1]])
