"""Cheat 2, nothing to check: run with `mass_sample = 0`, so no distribution is asked for,
and raise p(true token) to at least 0.99 everywhere.

Caught by: c1-target and c2-normalised ("cannot be verified" is a fail), and c2-blind.
"""
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
model_p = np.maximum(probs[val[position - 1], val[position]], 0.99)
h.write(req, position, model_p, entropy[val[position - 1]], [], [])
