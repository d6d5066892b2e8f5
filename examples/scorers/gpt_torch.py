"""The record's GPT in PyTorch, as a cachemoney scorer (docs/scorers.md).

Loads a `train` node's model.safetensors and config.json (the node's inputs.model) and
scores the val stream with the record's windows and temperature (algorithm.md §2-§4).
It is written independently of cachemoney's tch model, from the same spec, so that the
agreement of the two is evidence that both are the record's model:
`tests/scorers.rs` runs it on the demo model and compares it with our pass-1.

    params.command = [".venv/bin/python", "examples/scorers/gpt_torch.py",
                      "--temperature", "0.85", "--stride", "64"]
"""
import argparse
import json
import math
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

RMS_EPS = torch.finfo(torch.float32).eps  # RMSNorm with eps=None (§2.2)
BIGRAM_PRIMES = (36313, 27191)  # §2.4


def rms_norm(x):
    return x * (x.square().mean(-1, keepdim=True) + RMS_EPS).rsqrt()


class Gpt:
    def __init__(self, weights, c):
        self.w, self.c = weights, c
        self.layers, self.d = c["layers"], c["d_model"]
        self.h, self.hkv = c["heads"], c["kv_heads"]
        self.hd = self.d // self.h
        # RoPE angles in fp32 for positions 0..seq_len (§2.3), with the NTK-rescaled base.
        base = c["rope_base"]
        if c["seq_len"] > c["rope_train_len"] and c["rope_dims"] > 2:
            ratio = c["seq_len"] / c["rope_train_len"]
            base = base * ratio ** (c["rope_dims"] / (c["rope_dims"] - 2.0))
        half = c["rope_dims"] // 2
        freqs = torch.tensor([base ** (-2.0 * j / c["rope_dims"]) for j in range(half)], dtype=torch.float32)
        angles = torch.arange(c["seq_len"], dtype=torch.float32).unsqueeze(1).matmul(freqs.unsqueeze(0))
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, tokens):
        w, c = self.w, self.c
        e = F.embedding(tokens, w["tok_emb.weight"]) + self.bigram(tokens)
        x0 = self.smear(rms_norm(e))
        x, skips = x0, []
        encoder = self.layers // 2
        for i in range(encoder):
            x = self.block(i, x, x0)
            skips.append(x)
        for j, i in enumerate(range(encoder, self.layers)):
            if skips:
                x = x + w["skip_weights"][j] * skips.pop()
            x = self.block(i, x, x0)
        logits = rms_norm(x).matmul(w["tok_emb.weight"].t())
        return (logits / c["logit_softcap"]).tanh() * c["logit_softcap"]

    def bigram(self, tokens):  # §2.4: a hashed (previous, current) embedding
        last = self.c["bigram_rows"] - 1
        first = torch.full((tokens.shape[0], 1), last, dtype=torch.int64, device=tokens.device)
        rest = ((tokens[:, 1:] * BIGRAM_PRIMES[0]) ^ (tokens[:, :-1] * BIGRAM_PRIMES[1])).remainder(last)
        rows = F.embedding(torch.cat([first, rest], 1), self.w["bigram.embed.weight"])
        return rows.matmul(self.w["bigram.proj.weight"].t()) * self.w["bigram.scale"]

    def smear(self, x):  # §2.5: x_t <- (1-g) x_t + g x_{t-1}
        g = self.w["smear.gate"].sigmoid()
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        return x * (1.0 - g) + previous * g

    def block(self, i, x, x0):  # §2.2
        p = lambda name: self.w[f"blocks.{i}.{name}"]
        s = 1.0 / math.sqrt(i + 1)
        x_in = x * p("resid_mix")[0] + x0 * p("resid_mix")[1]
        x1 = x_in + p("attn_scale") * self.attention(i, rms_norm(x_in) * s)
        return x1 + p("mlp_scale") * self.mlp(i, rms_norm(x1) * s)

    def attention(self, i, u):  # §2.3, XSA on the last layers
        w, (b, n, d), l = self.w, u.shape, self.layers
        q = u.matmul(w["qo_bank"][i].t()).view(b, n, self.h, self.hd)
        k = u.matmul(w["kv_bank"][i].t()).view(b, n, self.hkv, self.hd)
        v = u.matmul(w["kv_bank"][l + i].t()).view(b, n, self.hkv, self.hd)
        q = self.rope(rms_norm(q), n) * w[f"blocks.{i}.attn.q_gain"].view(1, 1, self.h, 1)
        k = self.rope(rms_norm(k), n)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            dropout_p=0.0, is_causal=True, scale=1.0 / math.sqrt(self.hd), enable_gqa=True,
        ).transpose(1, 2)
        if i >= l - self.c["xsa_last"]:
            v_hat = v / v.norm(2, dim=-1, keepdim=True).clamp_min(1e-12)
            v_hat = v_hat.repeat_interleave(self.h // self.hkv, dim=2)
            y = y - (y * v_hat).sum(dim=[-1], keepdim=True, dtype=torch.float32) * v_hat
        return y.reshape(b, n, d).matmul(w["qo_bank"][l + i].t())

    def rope(self, x, n):  # rotate-half on the first rope_dims, by -theta
        half = self.c["rope_dims"] // 2
        cos, sin = (t[:n].view(1, n, 1, half).to(x.device) for t in (self.cos, self.sin))
        a, b, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        return torch.cat([a * cos + b * sin, -(a * sin) + b * cos, rest], 3)

    def mlp(self, i, z):  # §2.7: LeakyReLU(0.5) squared
        u = z.matmul(self.w["mlp_up_bank"][i].t())
        return u.maximum(u * 0.5).square().matmul(self.w["mlp_down_bank"][i].t())


def windows(targets, n_ctx, stride, tail):  # §4.1; tail "record" keeps §4.2's re-scored tail
    covered = 0
    for start in range(0, targets, stride):
        length = min(start + n_ctx, targets) - start
        first = 0 if start == 0 else max(length - stride, 0)
        if tail == "once":  # each target once: skip what an earlier window scored
            first = max(first, covered - start)
            if first >= length:
                continue
        covered = max(covered, start + length)
        yield start, length, first


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--temperature", type=float, default=0.85)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tail", choices=["once", "record"], default="once")
    args = ap.parse_args()
    request = json.load(sys.stdin)
    torch.set_num_threads(args.threads)
    model_dir = request["model_dir"]
    config = json.load(open(os.path.join(model_dir, "config.json")))
    weights = {k: t.float() for k, t in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    model = Gpt(weights, config)
    tokens = pq.read_table(request["val_parquet"], columns=["token"])["token"].to_numpy().astype("int64")
    wanted = set(request["distributions"])
    # Protocol 3: the n-gram tilt's hint of every target (by position - 1); answer p(hint).
    hints = None
    if request.get("hints_parquet"):
        hints = pq.read_table(request["hints_parquet"], columns=["hint"])["hint"].to_numpy().astype("int64")
    n_ctx = config["seq_len"]
    all_windows = list(windows(len(tokens) - 1, n_ctx, args.stride, args.tail))
    position, model_p, entropy, dists, hint_p = [], [], [], {}, []
    with torch.no_grad():
        for g in range(0, len(all_windows), args.batch):
            group = all_windows[g:g + args.batch]
            x = torch.zeros((len(group), n_ctx), dtype=torch.int64)
            for row, (start, length, _) in enumerate(group):
                x[row, :length] = torch.from_numpy(tokens[start:start + length])
            log_p = (model.forward(x).float() / args.temperature).log_softmax(-1)
            h = -(log_p.exp() * log_p).sum(dim=[-1], dtype=torch.float32)
            for row, (start, length, first) in enumerate(group):
                targets = torch.from_numpy(tokens[start + first + 1:start + length + 1])
                picked = log_p[row, first:length].gather(1, targets.unsqueeze(1)).exp().squeeze(1)
                if hints is not None:
                    hinted = torch.from_numpy(hints[start + first:start + length])
                    hint_p.append(log_p[row, first:length].gather(1, hinted.unsqueeze(1)).exp().squeeze(1))
                for j in range(first, length):
                    p = start + j + 1
                    if p in wanted and p not in dists:
                        dists[p] = log_p[row, j].exp()
                position.extend(range(start + first + 1, start + length + 1))
                model_p.append(picked)
                entropy.append(h[row, first:length])
    out = request["output_dir"]
    pq.write_table(pa.table({
        "position": pa.array(position, pa.int64()),
        "model_p": pa.array(torch.cat(model_p).numpy(), pa.float32()),
        "entropy": pa.array(torch.cat(entropy).numpy(), pa.float32()),
    }), os.path.join(out, "pass1.parquet"))
    if hints is not None:
        pq.write_table(pa.table({
            "position": pa.array(position, pa.int64()),
            "hint": pa.array(hints[[p - 1 for p in position]], pa.uint16()),
            "hint_p": pa.array(torch.cat(hint_p).numpy(), pa.float32()),
        }), os.path.join(out, "hint_p.parquet"))
    at = sorted(dists)
    vocab = request["vocab_size"]
    pq.write_table(pa.table({
        "position": pa.array([p for p in at for _ in range(vocab)], pa.int64()),
        "candidate": pa.array(list(range(vocab)) * len(at), pa.uint16()),
        "model_p": pa.array(torch.cat([dists[p] for p in at]).numpy() if at else [], pa.float32()),
    }), os.path.join(out, "distributions.parquet"))
    print(f"scored {len(position)} entries in {len(all_windows)} windows", file=sys.stderr)


if __name__ == "__main__":
    main()
