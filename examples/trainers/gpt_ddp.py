"""The record's GPT training in PyTorch with DistributedDataParallel, as a command.

It trains the model of algorithm.md §2 as our `train` stage does (§3): the same
initialisation from the same seed, the same data order, Muon for the four banks, the two
AdamW groups, global clipping, the step schedule and the EMA, written out by hand to
match `stages/gpt-torch/src/optim.rs` rather than taken from `torch.optim`. The forward
is `examples/scorers/gpt_torch.py`'s, so there is one PyTorch model. With one process,
our `threads` and our portable environment (below) on a CPU, the arithmetic is ours op
for op and the two files are our `train`'s byte for byte; with N processes each rank's
loss is the mean over its share, so the averaged gradient is the batch's up to rounding
and the result is close to ours, not equal.

It reads the request named by `CACHEMONEY_REQUEST` (protocol cachemoney-command/1; the
tokenize artifact's train, val and vocab tables) and writes exactly two files into the
request's `output_dir`: `model.safetensors` (the EMA weights in fp16 under the record's
tensor names, as our export) and `config.json` (the model's shape, as our `train`
writes it). It logs the loss, the validation BPB at the start, before the EMA and on the
fp16 EMA weights at the end (`final_val_bpb X`, as our report's) to stdout.

Two CPU processes (gloo), from the workspace:

    CACHEMONEY_REQUEST=request.json .venv/bin/python -m torch.distributed.run \\
        --standalone --nproc_per_node 2 examples/trainers/gpt_ddp.py --device cpu \\
        --config '{"layers": 2, "d_model": 64, "seq_len": 128, "xsa_last": 1}' --batch 8 \\
        --steps 150 --warmdown-steps 50 --momentum-warmup-steps 50 --val-every 0

Eight GPUs (nccl), the record's shape and batch (48 sequences of 2,048 per rank):

    CACHEMONEY_REQUEST=request.json python -m torch.distributed.run \\
        --standalone --nproc_per_node 8 examples/trainers/gpt_ddp.py --batch 384

`--batch` is the global batch in sequences, split evenly across the ranks. On a CPU the
bytes are the same from run to run with the same arguments and process count; set the
environment our `numerics = "portable"` sets (ATEN_CPU_CAPABILITY=avx2,
MKL_CBWR=COMPATIBLE, MKL_DYNAMIC=FALSE, ONEDNN_MAX_CPU_ISA=AVX2,
ONEDNN_DEFAULT_FPMATH_MODE=STRICT) for the same bytes on another machine.
"""
import argparse
import json
import math
import os
import sys
import time

import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scorers"))
from gpt_torch import Gpt  # noqa: E402  (the one PyTorch forward of the model)

# GptConfig's fields and defaults (stages/gpt/src/config.rs), in its order: config.json
# lists them in this order, as serde does.
GPT_CONFIG = {
    "vocab_size": 1024, "layers": 6, "d_model": 256, "heads": 4, "kv_heads": 2,
    "mlp_mult": 3, "rope_dims": 16, "rope_base": 10000.0, "rope_train_len": 1024,
    "seq_len": 2048, "qk_gain_init": 1.5, "logit_softcap": 30.0, "xsa_last": 4,
    "bigram_rows": 2048, "bigram_dim": 128, "bigram_scale_init": 0.05,
    "value_embedding": True, "ve_layer_scales": 2,
}
MUON_BANKS = ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank")
EMBEDDINGS = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # §3.5


def model_config(text):
    c = dict(GPT_CONFIG)
    for key, value in json.loads(text).items():
        if key not in c:
            sys.exit(f"--config: unknown field {key!r} (GptConfig has {', '.join(c)})")
        default = c[key]
        # Typed as serde would read them, so that config.json says 10000.0, not 10000.
        if isinstance(default, bool) != isinstance(value, bool) or (
                isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int)):
            sys.exit(f"--config: {key} = {value!r} is not a {type(default).__name__}")
        c[key] = float(value) if isinstance(default, float) else value
    # The shapes our GptConfig::validate refuses.
    for wrong, message in [
        (c["d_model"] % c["heads"], f"heads ({c['heads']}) do not divide d_model ({c['d_model']})"),
        (c["heads"] % c["kv_heads"], f"kv_heads ({c['kv_heads']}) do not divide heads ({c['heads']})"),
        (c["rope_dims"] % 2 or c["rope_dims"] > c["d_model"] // c["heads"],
         f"rope_dims {c['rope_dims']} must be even and at most the head dim"),
        (not 0 <= c["xsa_last"] <= c["layers"], f"xsa_last {c['xsa_last']} is outside 0..={c['layers']}"),
    ]:
        if wrong:
            sys.exit(f"--config: {message}")
    return c


def orthogonal(rows, cols):
    """tch's `Init::Orthogonal` (PyTorch's orthogonal_), drawn in the same order."""
    flat = torch.empty(rows, cols).normal_(0.0, 1.0)
    if rows < cols:
        flat = flat.t()
    q, r = torch.linalg.qr(flat, "reduced")
    q = q * r.diag().sign()
    return (q.t() if rows < cols else q).contiguous()


def init_weights(c):
    """§2.8, drawing from the global RNG in the order model.rs creates its variables, so
    that the same seed gives our trainer's initial weights."""
    l, d, v = c["layers"], c["d_model"], c["vocab_size"]
    kv_dim, hidden = c["kv_heads"] * (d // c["heads"]), c["mlp_mult"] * d
    encoder = l // 2

    def bank(n_orthogonal, n_zeros, rows, cols):
        slices = [orthogonal(rows, cols) for _ in range(n_orthogonal)]
        return torch.stack(slices + [torch.zeros(rows, cols)] * n_zeros)

    w = {"tok_emb.weight": torch.randn(v, d) * 0.005 + 0.0,
         "bigram.embed.weight": torch.zeros(c["bigram_rows"], c["bigram_dim"]),
         "bigram.proj.weight": orthogonal(d, c["bigram_dim"]),
         "bigram.scale": torch.ones([]) * c["bigram_scale_init"],
         "smear.gate": torch.zeros(d),
         "skip_weights": torch.ones(min(encoder, l - encoder), d),
         "qo_bank": bank(l, l, d, d),
         "kv_bank": bank(2 * l, 0, kv_dim, d),
         "mlp_up_bank": bank(l, 0, hidden, d),
         "mlp_down_bank": bank(0, l, d, hidden)}
    for i in range(l):
        w[f"blocks.{i}.attn.q_gain"] = torch.ones(c["heads"]) * c["qk_gain_init"]
        w[f"blocks.{i}.attn_scale"] = torch.ones(d)
        w[f"blocks.{i}.mlp_scale"] = torch.ones(d)
        w[f"blocks.{i}.resid_mix"] = torch.stack([torch.ones(d), torch.zeros(d)])
    if c["value_embedding"]:  # §2.6: stored and counted, never applied
        w["ve_shared.embed.weight"] = torch.randn(v, kv_dim) * 0.01 + 0.0
        w["ve_shared.scale"] = torch.ones([]) * 0.1
        for k in range(c["ve_layer_scales"]):
            w[f"ve_layer_scales.{k}"] = torch.ones([])
    return w


class Model(torch.nn.Module):
    """The weights the forward uses, as one module so that DDP averages their gradients.
    The never-applied ValueEmbedding (and an empty skip_weights) stays outside it: DDP
    refuses parameters that get no gradient."""

    def __init__(self, params, config):
        super().__init__()
        used = [n for n in sorted(params) if not n.startswith("ve_") and params[n].numel()]
        self.weights = torch.nn.ParameterList([params[n] for n in used])
        self.gpt = Gpt(params, config)

    def forward(self, tokens):
        return self.gpt.forward(tokens)


def exact_sqrt(x):
    """The correctly rounded root, as our optim::sqrt takes it (MKL's vector sqrt is off
    by a bit depending on the processor)."""
    return x.double().rsqrt().reciprocal().to(x.dtype)


def newton_schulz5(u):  # §3.5, on a bank of matrices [slices, rows, cols]
    tall = u.shape[-2] > u.shape[-1]
    x = u.transpose(-2, -1) if tall else u
    x = x / (exact_sqrt(x.square().sum(dim=(-2, -1), keepdim=True, dtype=x.dtype)) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(5):
        gram = x.matmul(x.transpose(-2, -1))
        x = x * a + (gram * b + gram.matmul(gram) * c).matmul(x)
    return x.transpose(-2, -1) if tall else x


class Muon:
    """Nesterov momentum, NS5, decoupled decay, a step scaled by sqrt(max(1, rows/cols))."""

    def __init__(self, banks, lr, weight_decay, warmup_steps):
        self.banks, self.lr, self.wd, self.warmup = banks, lr, weight_decay, warmup_steps
        self.buffers = [torch.zeros_like(b) for b in banks]

    @torch.no_grad()
    def step(self, step, scale):
        f = min(step / max(self.warmup, 1), 1.0)
        mu, lr = (1.0 - f) * 0.92 + f * 0.99, self.lr * scale
        for bank, buffer in zip(self.banks, self.buffers):
            if bank.grad is None:
                continue
            buffer.mul_(mu).add_(bank.grad)
            update = newton_schulz5(bank.grad + buffer * mu)
            shape_factor = math.sqrt(max(1.0, bank.shape[-2] / bank.shape[-1]))
            bank.mul_(1.0 - lr * self.wd)
            bank.sub_(update * (lr * shape_factor))


class AdamW:
    """PyTorch's AdamW in our optim.rs's order of operations (β 0.9, 0.95, ε 1e-8)."""

    def __init__(self, params, lr, weight_decay):
        self.params, self.lr, self.wd, self.steps = params, lr, weight_decay, 0
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]

    @torch.no_grad()
    def step(self, scale):
        self.steps += 1
        lr, (b1, b2) = self.lr * scale, (0.9, 0.95)
        c1, c2 = 1.0 - b1 ** self.steps, 1.0 - b2 ** self.steps
        for p, (m, v) in zip(self.params, self.moments):
            if p.grad is None:  # the ValueEmbedding keeps its initial values, undecayed
                continue
            m.mul_(b1).add_(p.grad * (1.0 - b1))
            v.mul_(b2).add_(p.grad.square() * (1.0 - b2))
            p.mul_(1.0 - lr * self.wd)
            p.sub_(m / c1 / (exact_sqrt(v / c2) + 1e-8) * lr)


@torch.no_grad()
def clip_grad_norm(params, max_norm):
    """§3.6 on the averaged gradient, norm summed in f64 in name order as ours."""
    grads = [p.grad for p in params if p.grad is not None]
    total = 0.0
    for g in grads:  # on the device, one sync
        total = total + g.square().sum(dtype=torch.float64)
    norm = math.sqrt(float(total))
    factor = min(max_norm / (norm + 1e-6), 1.0)
    if factor < 1.0:
        for g in grads:
            g.mul_(factor)
    return norm


def lr_multiplier(step, steps, warmdown_steps):  # §3.3, counted in steps
    remaining = max(steps - step, 0)
    return remaining / warmdown_steps if 0 < warmdown_steps and remaining <= warmdown_steps else 1.0


@torch.no_grad()
def validation_bpb(gpt, tokens, nbytes, seq_len, batch, rank, world, device):
    """§3.9: non-overlapping windows at temperature 1; rank r takes a contiguous share of
    the windows, the sums are all-reduced (one process adds exactly as our trainer)."""
    windows = (len(tokens) - 1) // seq_len
    lo, hi = windows * rank // world, windows * (rank + 1) // world
    nats, byte_total = 0.0, 0
    for first in range(lo, hi, batch):
        rows = min(hi - first, batch)
        start, end = first * seq_len, (first + rows) * seq_len
        x = torch.from_numpy(tokens[start:end]).view(rows, seq_len).to(device)
        y = torch.from_numpy(tokens[start + 1:end + 1]).to(device)
        logits = gpt.forward(x).float()
        nats += float(torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y, reduction="sum"))
        byte_total += int(nbytes[start + 1:end + 1].sum())
    sums = torch.tensor([nats, float(byte_total)], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    return float(sums[0]) / (math.log(2) * max(float(sums[1]), 1.0))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="{}", help="GptConfig fields as JSON; the rest take its defaults")
    ap.add_argument("--batch", type=int, default=48, help="global batch in sequences, split across ranks")
    ap.add_argument("--steps", type=int, default=15_676)
    ap.add_argument("--warmdown-steps", type=int, default=3_500)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--matrix-lr", type=float, default=0.025)
    ap.add_argument("--tied-embed-lr", type=float, default=0.035)
    ap.add_argument("--scalar-lr", type=float, default=0.025)
    ap.add_argument("--weight-decay", type=float, default=0.04)
    ap.add_argument("--grad-clip", type=float, default=0.3)
    ap.add_argument("--ema-decay", type=float, default=0.997)
    ap.add_argument("--momentum-warmup-steps", type=int, default=1_500)
    ap.add_argument("--val-every", type=int, default=4_000, help="0: at the start and the end only")
    ap.add_argument("--val-tokens", type=int, default=0, help="cap on val tokens (0: all)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    args = ap.parse_args()
    config = model_config(args.config)
    n = config["seq_len"]

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.batch % world:
        sys.exit(f"--batch {args.batch} does not split evenly across {world} ranks")
    local_batch = args.batch // world
    torch.set_num_threads(args.threads)
    log = print if rank == 0 else (lambda *a, **k: None)

    request = json.load(open(os.environ["CACHEMONEY_REQUEST"]))
    if request.get("protocol") != "cachemoney-command/1":
        sys.exit(f"not a cachemoney-command/1 request: {request.get('protocol')!r}")
    inputs = request["inputs"]["tokens"]
    table = lambda name: inputs.get("tables", {}).get(name) or os.path.join(inputs["dir"], f"{name}.parquet")
    train = pq.read_table(table("train"), columns=["token"])["token"].to_numpy().astype("int64")
    val = pq.read_table(table("val"), columns=["token", "bytes"])
    val_tokens = val["token"].to_numpy().astype("int64")
    val_bytes = val["bytes"].to_numpy().astype("int64")
    if args.val_tokens > 0:
        val_tokens, val_bytes = val_tokens[:args.val_tokens + 1], val_bytes[:args.val_tokens + 1]
    vocab = pq.read_table(table("vocab"), columns=["id"]).num_rows
    if vocab != config["vocab_size"]:
        sys.exit(f"--config: vocab_size is {config['vocab_size']}, but {table('vocab')} has {vocab} entries")
    if len(train) < 2 or len(val_tokens) <= n:
        sys.exit("too few train tokens, or too few val tokens for one validation window")

    # Every rank draws the same initial weights on the CPU (ours on a CPU draws the same
    # numbers), so a GPU run starts where a CPU run does; DDP broadcasts rank 0's anyway.
    torch.manual_seed(args.seed)
    params = {name: torch.nn.Parameter(t.to(device)) for name, t in init_weights(config).items()}
    model = Model(params, config)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False)
    names = sorted(params)
    ordered = [params[k] for k in names]
    # After DDP's all-reduce every rank holds the same averaged gradient, so every rank
    # runs the whole optimiser (Muon's NS5 included), the clip and the EMA on its own
    # copy: the copies stay identical without any further communication.
    muon = Muon([params[k] for k in names if k in MUON_BANKS], args.matrix_lr, args.weight_decay,
                args.momentum_warmup_steps)
    tok = AdamW([params[k] for k in names if k in EMBEDDINGS], args.tied_embed_lr, args.weight_decay)
    scalar = AdamW([params[k] for k in names if k not in MUON_BANKS + EMBEDDINGS], args.scalar_lr,
                   args.weight_decay)
    ema = [p.detach().float().clone() for p in ordered]
    validate = lambda: validation_bpb(model.gpt, val_tokens, val_bytes, n, local_batch, rank, world, device)

    log(f"{world} rank(s) on {args.device}, {local_batch} of {args.batch} sequences of {n} per rank, "
        f"{sum(p.numel() for p in ordered)} parameters")
    initial = validate()
    log(f"initial_val_bpb {initial}")
    want, pre_ema, started = args.batch * n + 1, initial, time.time()
    for step in range(args.steps):
        scale = lr_multiplier(step, args.steps, args.warmdown_steps)
        # §3.1: each step takes the next batch·seq_len + 1 tokens of the wrapping stream, as
        # our TokenStream does; rank r takes rows [r·b/N, (r+1)·b/N) of that batch.
        first = step * want + rank * local_batch * n
        at = (first + torch.arange(local_batch * n + 1, device="cpu")) % len(train)
        chunk = torch.from_numpy(train)[at]
        x = chunk[:-1].view(local_batch, n).to(device)
        y = chunk[1:].view(local_batch, n).to(device)
        for p in ordered:
            p.grad = None
        logits = ddp(x).float()
        loss = torch.nn.functional.nll_loss(logits.view(-1, config["vocab_size"]).log_softmax(-1), y.reshape(-1))
        loss.backward()
        clip_grad_norm(ordered, args.grad_clip)
        muon.step(step, scale)
        tok.step(scale)
        scalar.step(scale)
        with torch.no_grad():
            for shadow, p in zip(ema, ordered):
                shadow.mul_(args.ema_decay).add_(p.float() * (1.0 - args.ema_decay))
        done = step + 1
        if done % args.log_every == 0 or done == args.steps or done == 1:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)  # the ranks' shares are equal: their mean is the batch's
            mean_loss = float(mean_loss) / world
            if not math.isfinite(mean_loss):
                sys.exit(f"training diverged at step {done}: loss {mean_loss}; lower the learning rates")
            log(f"step {done} loss {mean_loss:.6f} lr {scale:.4f} {time.time() - started:.1f}s")
        if done == args.steps or (args.val_every > 0 and done % args.val_every == 0):
            pre_ema = validate()
            log(f"step {done} val_bpb {pre_ema}")
    log(f"pre_ema_val_bpb {pre_ema}")

    # §3.7, §3.10: the weights are the EMA, stored in fp16, and the BPB that counts is the
    # one of exactly those; every rank rounds the same way, so each can validate its share.
    exported = {}
    with torch.no_grad():
        for name, shadow, p in zip(names, ema, ordered):
            exported[name] = shadow.to(p.dtype).half().cpu().contiguous()
            p.copy_(exported[name])
    if rank == 0:
        out = request["output_dir"]
        os.makedirs(out, exist_ok=True)
        save_file(exported, os.path.join(out, "model.safetensors"))
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(json.dumps(config, indent=2) + "\n")
    log(f"final_val_bpb {validate()}")
    # Every rank past its last collective before any leaves: a rank that tears gloo
    # down while another is still in it aborts the run.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
