"""Cheat 7, a pass-1 that does not sum to 1, hidden behind a cache: every probability
doubled (capped at 1), distributions included, so the pass-1 is self-consistent but each
distribution sums to about 2. Put a cache chain after it and judge only the chain.

Caught by: c2-normalised on the cache chain (its pass-1's distributions are checked
too, in every run) and c2-blind.
"""
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
heavy = np.minimum(2.0 * probs, 1.0)
at = np.array(req["distributions"], dtype=np.int64)
h.write(req, position, heavy[val[position - 1], val[position]], entropy[val[position - 1]],
        at, heavy[val[at - 1]])
