"""Training at evaluation time (eval-techniques.md §4, §5) on the base bigram, in PyTorch.

    adapt.py slot           SLOT (#1240): a vector added to the logits, optimised on the
                            batch's own targets, then the batch scored with it (illegal)
    adapt.py slot-context   context-only SLOT (#1306): the vector optimised on the targets
                            already scored, then the batch scored (open question; causal)
    adapt.py ttt            score-first test-time training (#1514): each chunk scored, then
                            trained on (legal)
    adapt.py ttt-adapt      adapt-then-score (#1972's ruling): each chunk trained on, then
                            scored (invalid)

The base bigram's logits are the model; SLOT's vector is a logit bias (the bigram has no
hidden state to shift), optimised by AdamW as #1240 does, with a step large enough to show
on a bigram; test-time training trains the bigram's whole logit table with SGD.
"""
import sys

import numpy as np
import torch
from common import Setup, write

SLOT_BATCH, SLOT_STEPS, SLOT_LR = 16, 8, 0.1
TTT_CHUNK, TTT_STEPS, TTT_LR = 512, 2, 0.05


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


def main():
    s = Setup()
    torch.manual_seed(0)
    variant = sys.argv[1]
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
