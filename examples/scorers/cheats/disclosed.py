"""Cheat 1, disclosed positions: honest exactly where the request asks for distributions,
p(true token) raised to at least 0.99 everywhere else.

Caught by: c1-prefix (a re-run asks for other, secret positions: there it must tell the
truth, and the original's score before the cut no longer matches) and c2-blind.
"""
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
at = np.array(req["distributions"], dtype=np.int64)
model_p = probs[val[position - 1], val[position]]
asked = np.isin(position, at)
model_p = np.where(asked, model_p, np.maximum(model_p, 0.99))
h.write(req, position, model_p, entropy[val[position - 1]], at, probs[val[at - 1]])
