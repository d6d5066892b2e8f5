"""Training at evaluation time (docs/eval-techniques.md §4, §5) on the bigram, in PyTorch.

    adapt.py slot           SLOT (#1240): a vector added to the logits, optimised on the
                            batch's own targets, then the batch scored with it (illegal)
    adapt.py slot-context   context-only SLOT (#1306): the vector optimised on the targets
                            already scored, then the batch scored (open question; causal)
    adapt.py ttt            score-first test-time training (#1514): each chunk scored, then
                            trained on (legal)
    adapt.py ttt-adapt      adapt-then-score (#1972's ruling): each chunk trained on, then
                            scored (invalid)
    adapt.py tilt-ttt       #2135 (the top row): the token-only tilt's hints built in stream
                            order, score-first training over the documents longest first
                            (legal as ruled; no single order explains it, §5.4)

The base bigram's logits are the model; SLOT's vector is a logit bias (the bigram has no
hidden state to shift), optimised by AdamW as #1240 does, with a step large enough to show
on a bigram; test-time training trains the bigram's whole logit table with SGD.
"""
import sys

import numpy as np
import torch
from common import Setup, entropy, write

SLOT_BATCH, SLOT_STEPS, SLOT_LR = 16, 8, 0.1
TTT_CHUNK, TTT_STEPS, TTT_LR = 512, 2, 0.05
# tilt-ttt runs on the Python docs stream, where TTT_LR overshoots (BPB 2.54 against the
# base's 2.35); a tenth of it gains.
TILT_TTT_LR = 0.005


def slot_vectors(logits, targets):
    """#1240's δ for each batch at once: zeros, then AdamW steps on each batch's mean
    cross-entropy of logits + δ (batches are independent: AdamW works per element, and
    each batch's loss reaches only its own δ)."""
    batches, size, vocab = logits.shape
    delta = torch.zeros(batches, 1, vocab, dtype=logits.dtype, requires_grad=True)
    optimiser = torch.optim.AdamW([delta], lr=SLOT_LR, weight_decay=1e-8, eps=1e-5)
    for _ in range(SLOT_STEPS):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            (logits + delta).reshape(-1, vocab), targets.reshape(-1), reduction="sum") / size
        loss.backward()
        optimiser.step()
    return delta.detach()


def slot(s, context_only):
    log_probs = torch.from_numpy(s.log_probs.astype(np.float32))
    val = torch.from_numpy(s.val)
    t = torch.from_numpy(s.position)
    full = len(t) // SLOT_BATCH * SLOT_BATCH
    whole, last = t[:full].reshape(-1, SLOT_BATCH), t[full:].reshape(1, -1)
    logits, targets = log_probs[val[whole - 1]], val[whole]
    deltas = slot_vectors(logits, targets)
    if context_only:
        # Each batch's δ from the targets already scored: the previous batch's.
        scoring = torch.cat([torch.zeros_like(deltas[:1]), deltas[:-1]])
        last_delta = deltas[-1:]
    else:
        scoring = deltas
        last_delta = slot_vectors(log_probs[val[last - 1]], val[last]) if last.numel() else None
    scored = [torch.log_softmax(logits + scoring, dim=2).reshape(-1, logits.shape[2])]
    if last.numel():
        scored.append(torch.log_softmax(log_probs[val[last - 1]] + last_delta, dim=2)[0])
    return torch.cat(scored).double()


def ttt(s, adapt_first):
    table = torch.from_numpy(s.log_probs.copy()).requires_grad_(True)
    optimiser = torch.optim.SGD([table], lr=TTT_LR, momentum=0.9)
    val = torch.from_numpy(s.val)
    positions = s.position
    scored = []

    def train(t):
        for _ in range(TTT_STEPS):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(table[val[t - 1]], val[t], reduction="sum").backward()
            optimiser.step()

    for start in range(0, len(positions), TTT_CHUNK):
        t = torch.from_numpy(positions[start:start + TTT_CHUNK])
        if adapt_first:
            train(t)
        with torch.no_grad():
            scored.append(torch.log_softmax(table[val[t - 1]], dim=1))
        if not adapt_first:
            train(t)
    return torch.cat(scored)


def longest_first(doc):
    """Each token's rank when documents (runs of one `doc` value, counted over the whole
    val stream) go longest first, equal lengths in stream order: the order the pipeline's
    `order = "longest_first"` declares."""
    starts = np.flatnonzero(np.r_[True, doc[1:] != doc[:-1]])
    lengths = np.diff(np.r_[starts, len(doc)])
    rank, taken = np.empty(len(doc), np.int64), 0
    for d in np.argsort(-lengths, kind="stable"):
        rank[starts[d]:starts[d] + lengths[d]] = np.arange(taken, taken + lengths[d])
        taken += lengths[d]
    return rank


def tilt_ttt(s):
    """#2135's two orders: hints from the whole stream before each target (stream order),
    and the bigram's table trained on each chunk of documents after scoring it, documents
    taken longest first. Returns model_p, entropy (stream order) and the distributions
    used at the asked positions."""
    from tilt import TOKEN_BETA, TOKEN_THRESHOLD, token_hints
    hint, share = token_hints(s.val)
    beta = np.where(share >= TOKEN_THRESHOLD, TOKEN_BETA, 0.0)
    table = torch.from_numpy(s.log_probs.copy()).requires_grad_(True)
    optimiser = torch.optim.SGD([table], lr=TILT_TTT_LR, momentum=0.9)
    val = torch.from_numpy(s.val)
    rank = longest_first(s.doc)
    processing = s.position[np.argsort(rank[s.position], kind="stable")]
    model_p = np.zeros(len(s.val))
    entropies = np.zeros(len(s.val))
    asked = {int(a): None for a in s.asked}
    for start in range(0, len(processing), TTT_CHUNK):
        t = processing[start:start + TTT_CHUNK]
        with torch.no_grad():
            rows = torch.softmax(table[val[t - 1]], dim=1).double().numpy()
        weight = np.exp(beta[t])
        tilted = rows.copy()
        tilted[np.arange(len(t)), hint[t]] *= weight
        tilted /= (1.0 + rows[np.arange(len(t)), hint[t]] * (weight - 1.0))[:, None]
        model_p[t] = tilted[np.arange(len(t)), s.val[t]]
        entropies[t] = entropy(tilted)
        for i, position in enumerate(t):
            if int(position) in asked:
                asked[int(position)] = tilted[i]
        # Trained on the untilted loss, as #2135 does, after the chunk is scored, and
        # only where the context is the target's own document (#2135 trains each
        # document from its BOS): a document's first target reads the last token of its
        # neighbour in the stream, which other documents must not learn from before
        # that neighbour is scored.
        inside = t[s.doc[t - 1] == s.doc[t]]
        for _ in range(TTT_STEPS):
            optimiser.zero_grad()
            step = torch.from_numpy(inside)
            torch.nn.functional.cross_entropy(table[val[step - 1]], val[step], reduction="sum").backward()
            optimiser.step()
    return model_p[s.position], entropies[s.position], np.array([asked[int(a)] for a in s.asked])


def main():
    s = Setup()
    torch.manual_seed(0)
    variant = sys.argv[1]
    if variant == "tilt-ttt":
        model_p, entropies, dists = tilt_ttt(s)
        write(s.req, s.position, model_p, entropies, s.asked, dists)
        return
    runs = {
        "slot": lambda: slot(s, context_only=False),
        "slot-context": lambda: slot(s, context_only=True),
        "ttt": lambda: ttt(s, adapt_first=False),
        "ttt-adapt": lambda: ttt(s, adapt_first=True),
    }
    if variant not in runs:
        sys.exit(f"adapt.py: unknown variant {variant!r} ({', '.join(runs)})")
    log_p = runs[variant]().numpy()  # one row per scored target, in order
    rows = np.exp(log_p)
    targets = s.val[s.position]
    model_p = rows[np.arange(len(rows)), targets]
    entropies = -(rows * log_p).sum(1)
    at_rows = s.asked - s.position[0]
    write(s.req, s.position, model_p, entropies, s.asked, rows[at_rows])


if __name__ == "__main__":
    main()
