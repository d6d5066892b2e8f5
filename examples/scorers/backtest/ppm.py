"""Byte-level PPM mixtures (docs/eval-techniques.md §3) on the base bigram, as a scorer.

    ppm.py split        #1835: every byte of a target gets the model's p^(1/n) share,
                        mixed with an order-5 PPM per byte (not normalised over tokens)
    ppm.py normalised   Path A of #1916: the PPM's token probabilities s(v), normalised
                        over the vocabulary, mixed with the model with a weight read from
                        the prefix alone (normalised by construction)
    ppm.py conditional  #2039: the model's first-byte marginal mixed with the PPM, then
                        the rest of the target with a weight read from the target's own
                        remaining bytes (not normalised; the weight sees the target)

At a position it is asked about, each writes the token distribution it used: every
candidate's probability as the realised target's choices (mixing weights) made them.
"""
import math
import sys

import numpy as np
from common import Setup, entropy, write

ORDER = 5


class PPM:
    """Counts of each byte after each context of 0 … ORDER previous bytes; PPM method C
    (escape u/(n+u)), no exclusion, so its probabilities over bytes sum to less than 1."""

    def __init__(self, order=ORDER):
        self.order, self.counts = order, {}

    def prob(self, byte, window, extra=None):
        """(p(byte), confidence at the longest seen context); `extra` holds counts added on
        a copy of the state (a candidate's own earlier bytes)."""
        escape, confidence = 1.0, None
        for k in range(min(self.order, len(window)), -1, -1):
            context = window[len(window) - k:]
            seen = self.counts.get(context, {})
            added = extra.get(context, {}) if extra else {}
            if not seen and not added:
                continue
            n = sum(seen.values()) + sum(added.values())
            distinct = len(seen.keys() | added.keys())
            if confidence is None:
                top = max(seen.get(b, 0) + added.get(b, 0) for b in seen.keys() | added.keys())
                confidence = top / (n + distinct)
            count = seen.get(byte, 0) + added.get(byte, 0)
            if count:
                return escape * count / (n + distinct), confidence
            escape *= distinct / (n + distinct)
        return escape / 256, confidence or 0.0

    def update(self, byte, window, extra=None):
        target = self.counts if extra is None else extra
        for k in range(0, min(self.order, len(window)) + 1):
            context = window[len(window) - k:]
            table = target.setdefault(context, {})
            table[byte] = table.get(byte, 0) + 1


def split_score(ppm, window, piece, p):
    """#1835's mixed probability of a token with bytes `piece` and model probability p."""
    if not piece:
        return p, window
    share, score, extra = p ** (1.0 / len(piece)), 1.0, {}
    for b in piece:
        p_ppm, confidence = ppm.prob(b, window, extra)
        weight = 0.05 if confidence >= 0.9 else 0.9  # the model's weight
        score *= weight * share + (1.0 - weight) * p_ppm
        ppm.update(b, window, extra)
        window = (window + bytes([b]))[-ORDER:]
    return score, window


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def conditional_rest(ppm, window, piece, extra):
    """The PPM product over a token's bytes after the first, and their mean confidence."""
    ppm.update(piece[0], window, extra)
    window = (window + piece[:1])[-ORDER:]
    product, confidences = 1.0, []
    for b in piece[1:]:
        p_ppm, confidence = ppm.prob(b, window, extra)
        product *= p_ppm
        confidences.append(confidence)
        ppm.update(b, window, extra)
        window = (window + bytes([b]))[-ORDER:]
    return product, (sum(confidences) / len(confidences) if confidences else 0.0)


def conditional_score(first, rest_weight, piece, p, marginal):
    """#2039: P1(first byte) times the rest, mixed with the weight given."""
    if len(piece) == 1:
        return first(piece[0])
    product = rest_weight[1]
    model_rest = p / marginal[piece[0]] if marginal[piece[0]] > 0 else 0.0
    return first(piece[0]) * (rest_weight[0] * model_rest + (1.0 - rest_weight[0]) * product)


def run_split_or_conditional(s, variant):
    val, vocab = s.val, s.vocab
    ppm, window = PPM(), b""
    asked = set(s.asked.tolist())
    model_p, entropies, dists = [], entropy(s.probs[val[s.position - 1]]), {}
    layouts = {}

    def pieces_for(previous):
        """Every token's bytes and first byte (256: none), by the space rule's case."""
        key = bool(vocab.boundary[previous])
        if key not in layouts:
            pieces = [vocab.bytes_of(v, previous) for v in range(s.vocab_size)]
            layouts[key] = (pieces, np.array([pc[0] if pc else 256 for pc in pieces]))
        return layouts[key]

    for t in s.position:
        row, y = s.base(t), val[t]
        pieces, firsts = pieces_for(val[t - 1])
        piece = pieces[y]
        if variant == "split":
            if t in asked:
                dists[t] = [split_score(ppm, window, pc, row[v])[0] for v, pc in enumerate(pieces)]
            score = split_score(ppm, window, piece, row[y])[0]
        else:
            marginal = np.bincount(firsts, weights=row, minlength=257)[:256]
            weight = 1.0 - sigmoid(15.0 * (ppm.prob(0, window)[1] - 0.8))
            first_cache = {}

            def first(b):
                if b not in first_cache:
                    first_cache[b] = weight * marginal[b] + (1.0 - weight) * ppm.prob(b, window)[0]
                return first_cache[b]

            def rest(pc):
                product, mean_conf = conditional_rest(ppm, window, pc, {})
                return product, 1.0 - sigmoid(15.0 * (mean_conf - 0.8))

            # The weight of the rest is read from the realised target's own bytes.
            own = rest(piece)[1] if piece else 1.0

            def score_of(v):
                pc = pieces[v]
                if not pc:
                    return row[v]
                return conditional_score(first, (own, rest(pc)[0] if len(pc) > 1 else 1.0),
                                         pc, row[v], marginal)

            if t in asked:
                dists[t] = [score_of(v) for v in range(s.vocab_size)]
            score = score_of(y)
        model_p.append(score)
        for b in piece:
            ppm.update(b, window)
            window = (window + bytes([b]))[-ORDER:]
    return model_p, entropies, [dists[t] for t in s.asked.tolist()]


class ByteLevel:
    """An order-1 PPM (method C, no exclusion) kept as dense arrays, so that the
    probability of every token's bytes, s(v), is a few array operations per position."""

    def __init__(self, pieces_of):
        self.after = np.zeros((256, 256))  # counts of b after c
        self.alone = np.zeros(256)  # counts of b
        self.last = None
        self.pieces_of = pieces_of

    def order0(self):
        n, distinct = self.alone.sum(), (self.alone > 0).sum()
        if n == 0:
            return np.full(256, 1.0 / 256)
        return np.where(self.alone > 0, self.alone / (n + distinct), distinct / (n + distinct) / 256)

    def token_probs(self, previous):
        """s(v) for every token v, each byte under the state before the target."""
        p0 = self.order0()
        n, distinct = self.after.sum(1), (self.after > 0).sum(1)
        seen = n > 0
        denominator = np.where(seen, n + distinct, 1.0)
        matrix = np.where(self.after > 0, self.after / denominator[:, None],
                          (distinct / denominator)[:, None] * p0[None, :])
        matrix[~seen] = p0
        before, byte, valid, first = self.pieces_of(previous)
        start = matrix[self.last] if self.last is not None else p0
        inner = np.where(valid, matrix[before, byte], 1.0).prod(1)
        return np.where(first >= 0, start[np.maximum(first, 0)], 0.0) * inner

    def confidence(self):
        if self.last is not None and self.after[self.last].sum() > 0:
            row = self.after[self.last]
            return row.max() / (row.sum() + (row > 0).sum())
        n = self.alone.sum()
        return self.alone.max() / (n + (self.alone > 0).sum()) if n else 0.0

    def update(self, piece):
        for b in piece:
            if self.last is not None:
                self.after[self.last, b] += 1
            self.alone[b] += 1
            self.last = b


def run_normalised(s):
    val, vocab = s.val, s.vocab
    layouts = {}

    def pieces_of(previous):
        """Index arrays of every token's byte pairs, by whether the previous token is a
        boundary (the space rule)."""
        key = bool(vocab.boundary[previous])
        if key not in layouts:
            pieces = [vocab.bytes_of(v, previous) for v in range(s.vocab_size)]
            width = max(1, max(len(p) for p in pieces) - 1)
            before = np.zeros((len(pieces), width), np.int64)
            byte = np.zeros_like(before)
            valid = np.zeros(before.shape, bool)
            first = np.array([p[0] if p else -1 for p in pieces])
            for v, p in enumerate(pieces):
                for j in range(1, len(p)):
                    before[v, j - 1], byte[v, j - 1], valid[v, j - 1] = p[j - 1], p[j], True
            layouts[key] = (before, byte, valid, first)
        return layouts[key]

    ppm = ByteLevel(pieces_of)
    asked = set(s.asked.tolist())
    model_p, entropies, dists = [], [], {}
    for t in s.position:
        row, y = s.base(t), val[t]
        weight = 0.05 if ppm.confidence() >= 0.9 else 0.9  # from the prefix alone
        token_ppm = ppm.token_probs(val[t - 1])
        mixed = weight * row + (1.0 - weight) * token_ppm / token_ppm.sum()
        model_p.append(mixed[y])
        entropies.append(entropy(mixed))
        if t in asked:
            dists[t] = mixed
        ppm.update(vocab.bytes_of(y, val[t - 1]))
    return model_p, entropies, [dists[t] for t in s.asked.tolist()]


def main():
    s = Setup()
    variant = sys.argv[1]
    if variant == "normalised":
        model_p, entropies, dists = run_normalised(s)
    elif variant in ("split", "conditional"):
        model_p, entropies, dists = run_split_or_conditional(s, variant)
    else:
        sys.exit(f"ppm.py: unknown variant {variant!r} (split, normalised, conditional)")
    write(s.req, s.position, model_p, entropies, s.asked, dists)


if __name__ == "__main__":
    main()
