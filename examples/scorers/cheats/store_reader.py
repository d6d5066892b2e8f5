"""Cheat 3, the scorer sees more than its input: a two-pass bigram over the val stream
(the leak of leaky_cache.py), computed from the *original* stream whenever it can find it,
so that a re-run on a shuffled stream scores its prefix exactly as the original did.

It looks for the original everywhere a scorer might: a side file left by an earlier run
(in $HOME, /tmp, /dev/shm, /var/tmp, next to itself), the store (any artifacts/ above its
working directory, or named in the environment), and the request's own paths. What it
found is printed to its log. In the sandbox it finds nothing and leaks from the stream it
was given: caught by c1-prefix, c1-target and c2-blind.
"""
import glob, os, sys
import numpy as np
import honest as h

req = h.request()
val, probs, entropy, position = h.score(req)
vocab = req["vocab_size"]
found = None
candidates = []
for place in [os.environ.get("HOME", ""), "/tmp", "/dev/shm", "/var/tmp",
              os.path.dirname(os.path.abspath(__file__))]:
    candidates.append(os.path.join(place, ".cheat-original-val.npy"))
for key, value in os.environ.items():
    if "artifacts" in value or "CACHEMONEY" in key:
        print(f"environment: {key}={value}", file=sys.stderr)
here = os.path.abspath(".")
while True:
    candidates.extend(glob.glob(os.path.join(here, "artifacts", "tokenize", "*", "val.parquet")))
    if here == "/":
        break
    here = os.path.dirname(here)
for path in candidates:
    try:
        other = np.load(path) if path.endswith(".npy") else h.tokens(path)
    except Exception:
        continue
    if len(other) == len(val):
        found = other
        print(f"found the original stream at {path}", file=sys.stderr)
        break
if found is None:
    print(f"found no original stream ({len(candidates)} places tried)", file=sys.stderr)
    found = val
    for path in candidates[:5]:
        try:
            np.save(path, val)  # for the next run
        except Exception:
            pass
leak, _ = h.bigram(found, vocab)  # counts over the whole stream, its future included
mixed = 0.5 * probs + 0.5 * leak
at = np.array(req["distributions"], dtype=np.int64)
model_p = mixed[val[position - 1], val[position]]
ent = -(mixed * np.log(mixed)).sum(1)
h.write(req, position, model_p, ent[val[position - 1]], at, mixed[val[at - 1]])
