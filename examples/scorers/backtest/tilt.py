"""The n-gram tilt (docs/eval-techniques.md §1, §2, §2.7) on the base bigram, as a scorer.

    tilt.py token      the token-only tilt of #2135 (legal: the leaderboard's top row)
    tilt.py channels   the token tilt plus the within-word channel of #1145, whose gate
                       reads the class of the target itself (not accepted)
    tilt.py 1514       the prefix-gated multi-order kernel of #1420/#1514 (legal, merged)

A hint is at most one token per position, read from the prefix's past continuations; its
logit gets a boost β and the distribution is renormalised exactly: p'(a) = p(a)·e^{β[a=h]}/Z,
Z = 1 + p(h)(e^β − 1). Contexts are keyed by their tokens (a dict), not by the reference's
64-bit hashes: the same hints except where two contexts' hashes collide.
"""
import sys
from collections import deque

import numpy as np
from common import Setup, entropy, write

TOKEN_ORDER, TOKEN_THRESHOLD, TOKEN_BETA = 16, np.float32(0.8), 2.625
WITHIN_THRESHOLD, WITHIN_BETA, AGREEMENT_BONUS = np.float32(0.45), 0.75, 0.5
# #1514: (context order, share threshold, minimum count), highest order first.
ORDERS_1514 = [(16, 0.50, 2), (14, 0.50, 2), (12, 0.60, 2), (10, 0.70, 3), (8, 0.70, 3)]


class Contexts:
    """Per context its total, its top count and top token; per (context, token) a count.
    The top token is the first to reach the current maximum (strict >)."""

    def __init__(self):
        self.contexts, self.pairs = {}, {}

    def lookup(self, key):
        """(hint, share in f32, total), or (0, 0, 0) for an unseen context."""
        entry = self.contexts.get(key)
        if entry is None:
            return 0, np.float32(0.0), 0
        total, top, token = entry
        return token, np.float32(top) / np.float32(total), total

    def update(self, key, token):
        count = self.pairs.get((key, token), 0) + 1
        self.pairs[(key, token)] = count
        entry = self.contexts.get(key)
        if entry is None:
            self.contexts[key] = [1, count, token]
        else:
            entry[0] += 1
            if count > entry[1]:
                entry[1], entry[2] = count, token


def token_hints(val):
    """#2135's token channel: per position, (hint, share); read before the target counts.
    The ring is seeded with the first target (y_0), as #2135 does."""
    width = TOKEN_ORDER - 1
    hint, share = np.zeros(len(val), np.int64), np.zeros(len(val), np.float32)
    table, ring = Contexts(), deque([val[1]] if len(val) > 1 else [], maxlen=width)
    for t in range(1, len(val)):
        if len(ring) == width:
            key = tuple(ring)
            hint[t], share[t], _ = table.lookup(key)
            table.update(key, val[t])
        ring.append(val[t])
    return hint, share


def within_hints(val, vocab):
    """#1145's within-word channel: a hint only when the *target* continues a word (not a
    boundary, not a word start): the gate reads the target's class."""
    hint, share = np.zeros(len(val), np.int64), np.zeros(len(val), np.float32)
    valid = np.zeros(len(val), bool)
    table, word = Contexts(), ()
    for t in range(1, len(val)):
        y = val[t]
        if not vocab.boundary[y] and not vocab.new_word[y] and word:
            valid[t] = True
            hint[t], share[t], _ = table.lookup(word)
        if vocab.boundary[y]:
            word = ()
        elif vocab.new_word[y] or not word:
            word = (y,)
        else:
            table.update(word, y)
            word = word + (y,)
    return hint, share, valid


def channel_gain(share, beta):
    """#2135's score of a gated channel: p·β − ln(1 + p(e^β − 1)), p its own share."""
    return share * beta - np.log1p(share * np.expm1(beta))


def hints_1514(val):
    """#1420/#1514: token contexts of orders 16 … 8, highest first, each with its own share
    threshold and minimum count; β = 2 × share; from the prefix alone."""
    hint, beta = np.zeros(len(val), np.int64), np.zeros(len(val))
    tables = {order: Contexts() for order, _, _ in ORDERS_1514}
    for t in range(1, len(val)):
        for order, threshold, minimum in ORDERS_1514:
            width = order - 1
            if t < width:
                continue
            key = tuple(val[t - width:t])
            token, share, total = tables[order].lookup(key)
            if beta[t] == 0 and total >= minimum and share >= np.float32(threshold):
                hint[t], beta[t] = token, 2.0 * float(share)
            tables[order].update(key, val[t])
    return hint, beta


def main():
    s = Setup()
    val, variant = s.val, sys.argv[1]
    if variant == "1514":
        hint, beta = hints_1514(val)
    else:
        hint, share = token_hints(val)
        gated = share >= TOKEN_THRESHOLD
        beta = np.where(gated, TOKEN_BETA, 0.0)
        if variant == "channels":
            w_hint, w_share, valid = within_hints(val, s.vocab)
            w_gated = valid & (w_share >= WITHIN_THRESHOLD)
            token_gain = np.where(gated, channel_gain(share.astype(float), TOKEN_BETA), -np.inf)
            within_gain = np.where(w_gated, channel_gain(w_share.astype(float), WITHIN_BETA), -np.inf)
            take_within = within_gain > token_gain  # ties go to the token channel
            # Two gated channels proposing the chosen token agree: a larger boost.
            agree = gated & w_gated & (hint == w_hint)
            hint = np.where(take_within, w_hint, hint)
            beta = np.where(take_within, WITHIN_BETA, beta) + np.where(agree, AGREEMENT_BONUS, 0.0)
        elif variant != "token":
            sys.exit(f"tilt.py: unknown variant {variant!r} (token, channels, 1514)")

    t = s.position
    rows = s.probs[val[t - 1]]
    weight = np.exp(beta[t])
    q = rows[np.arange(len(t)), hint[t]]
    z = 1.0 + q * (weight - 1.0)
    scored = np.where(val[t] == hint[t], weight, 1.0)
    model_p = (rows[np.arange(len(t)), val[t]] * scored) / z
    base_h = entropy(rows)
    tilted_h = np.log(z) - (-base_h + q * (weight - 1.0) * np.log(q) + q * weight * beta[t]) / z

    at = s.asked
    dists = s.probs[val[at - 1]].copy()
    weights = np.ones_like(dists)
    weights[np.arange(len(at)), hint[at]] = np.exp(beta[at])
    dists = (dists * weights) / (1.0 + dists[np.arange(len(at)), hint[at]] * (np.exp(beta[at]) - 1.0))[:, None]
    write(s.req, t, model_p, tilted_h, at, dists)


if __name__ == "__main__":
    main()
