"""Cheat 4, the entropy channel: model_p honest, but the entropy (which sets how much a
cache chain trusts its n-grams) chosen from the target: low when the bigram's favourite
is wrong, so the cache takes over exactly there. Honest at the asked positions.

Caught by: c1-prefix (a re-run asks elsewhere, and its entropies there are honest) and,
where the distribution is asked, c2-normalised's entropy check.
"""
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
at = np.array(req["distributions"], dtype=np.int64)
previous, target = val[position - 1], val[position]
right = probs[previous].argmax(1) == target
chosen = np.where(right, 8.0, 0.01)
chosen = np.where(np.isin(position, at), entropy[previous], chosen)
h.write(req, position, probs[previous, target], chosen, at, probs[val[at - 1]])
