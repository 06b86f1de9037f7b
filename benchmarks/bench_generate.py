"""Generation with the KV cache vs recomputing the whole sequence every step, in one run.

The real-size model (random weights), a 512-token prompt, 256 new tokens, greedy. With the
cache, each step runs one token through the model and reads the cached keys/values; without
it (`generate_without_cache`), step n runs all 512+n tokens again. Both must produce the
same tokens (checked). Also prints transformers' LlamaForCausalLM.generate (its own cache)
with the same weights as a peer, and ours with `compile=True` (static KV cache, torch.compile'd
decode step; its one-time compile is timed and printed apart, not counted in its runs).

    python benchmarks/bench_generate.py --device cuda      # the full no-cache baseline
    python benchmarks/bench_generate.py --nocache-stride 16   # CPU: a few minutes
    python benchmarks/bench_generate.py --threads 1 --nocache-stride 256 --repeats 3   # CPU, quick
    python benchmarks/bench_generate.py --threads 1 --steps-only --repeats 5   # ms per decode step

On a CPU the no-cache baseline alone takes many minutes (256 forwards of 512-767 tokens).
`--nocache-stride s` times only the forwards of steps 0, s, 2s, ... (step n = one forward over
prompt + n tokens, then argmax, exactly what `generate_without_cache` does at that step) and counts
each for s steps; tokens are still checked against a real `generate_without_cache` run of
`--check` steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.attention import KVCache
from minimind_v.generate import generate, generate_without_cache
from minimind_v.linear import few_rows_linear
from minimind_v.static_decode import StaticKVCache, compiled_step, static_slots


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.no_grad()
def time_steps(model, prompt, args, n=32):
    """ms per decode step after the prompt: the eager cached step, the compiled static-cache step, and
    a floor: the products of every weight matrix with one token's vector (the bytes every step reads),
    as the model's `Linear` computes them (`few_rows_linear`) and through `F.linear`."""
    cfg, T = model.cfg, prompt.shape[1]
    cache = KVCache()
    model(prompt, kv_cache=cache)
    static = StaticKVCache(cfg.num_layers, 1, static_slots(T, args.new, cfg.max_seq_len), cfg.num_kv_heads,
                           cfg.head_dim)
    static.fill(cache)
    step = compiled_step()
    t0 = time.perf_counter()
    step(model, prompt[:, :1], torch.tensor([T]), static)
    print(f"compiling the decode step: {time.perf_counter() - t0:.1f} s")
    weights = [p for p in model.parameters() if p.dim() == 2]                 # 57 matrices, head included
    vec = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    tok = prompt[:, :1]
    runs = {"eager step": lambda i: model(tok, kv_cache=cache),
            "compiled step": lambda i: step(model, tok, torch.tensor([T + i]), static),
            "products alone": lambda i: [few_rows_linear(vec[w.shape[1]], w) for w in weights],
            "F.linear alone": lambda i: [F.linear(vec[w.shape[1]], w) for w in weights]}
    times = {name: [] for name in runs}
    for _ in range(args.repeats):                                             # round-robin blocks
        for name, fn in runs.items():
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            times[name].append((time.perf_counter() - t0) / n * 1e3)
    for name, ts in times.items():
        print(f"{name:<16} {statistics.median(ts):6.2f} ms/step   (blocks: " + " ".join(f"{t:.2f}" for t in ts) + ")")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the cached runs (median)")
    ap.add_argument("--nocache-repeats", type=int, default=1, help="repeats of the slow baseline")
    ap.add_argument("--nocache-stride", type=int, default=1,
                    help="1: run generate_without_cache fully; s > 1: time every s-th step's forward, x s")
    ap.add_argument("--check", type=int, default=16, help="with a stride: no-cache steps run to check tokens")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled contestant")
    ap.add_argument("--steps-only", action="store_true",
                    help="time single decode steps instead: eager, compiled, and the weights' products alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LMConfig()
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"prompt {args.prompt}, new {args.new}, greedy")
    torch.manual_seed(0)
    hf = None
    if not args.no_hf:
        import transformers
        hcfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
            max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True)
        hf = transformers.LlamaForCausalLM(hcfg).eval().to(device)
        model = load_upstream(hf.state_dict(), cfg).eval().to(device)
    else:
        from minimind_v.lm import MiniMindLM
        model = MiniMindLM(cfg).eval().to(device)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=device)

    if args.steps_only:
        return time_steps(model, prompt, args)
    generate(model, prompt[:, :16], 4)                                      # warmup
    if not args.no_compile:      # the same static length as the timed runs: compiles the step they use
        t, _ = timed(lambda: generate(model, prompt, 2, compile=True), device)
        print(f"compile=True warm-up (compiling the decode step): {t:.1f} s")
    cached, compiled, hf_times = [], [], []
    for _ in range(args.repeats):           # round-robin, so a change in machine load hits all alike
        t, out = timed(lambda: generate(model, prompt, args.new), device)
        cached.append(t)
        if not args.no_compile:
            t, cout = timed(lambda: generate(model, prompt, args.new, compile=True), device)
            compiled.append(t)
        if hf is not None:
            with torch.no_grad():
                t, hout = timed(lambda: hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                                                    do_sample=False, pad_token_id=0), device)
            hf_times.append(t)
    nocache = []
    if args.nocache_stride == 1:
        for _ in range(args.nocache_repeats):
            t, ref = timed(lambda: generate_without_cache(model, prompt, args.new), device)
            nocache.append(t)
        same = torch.equal(out, ref)
    else:
        ref = generate_without_cache(model, prompt, args.check)
        same = torch.equal(out[:, :ref.shape[1]], ref)
        for _ in range(args.nocache_repeats):
            total = 0.0
            for n in range(0, args.new, args.nocache_stride):
                with torch.no_grad():
                    t, _ = timed(lambda: model(out[:, :args.prompt + n])[:, -1, :].argmax(dim=-1), device)
                total += t * min(args.nocache_stride, args.new - n)
            nocache.append(total)
        print(f"no-cache time estimated from every {args.nocache_stride}th step; "
              f"tokens checked on the first {args.check} steps")
    rows = [("ours, KV cache", cached), ("ours, no cache", nocache)]
    if compiled:
        rows.insert(1, ("ours, compiled", compiled))
        print(f"compiled tokens == eager cached tokens: {torch.equal(cout, out)}")
    if hf is not None:
        rows.append(("hf generate", hf_times))
        print(f"hf tokens equal ours: {torch.equal(hout, out)}")
    print(f"cached tokens == no-cache tokens: {same}")
    base = statistics.median(cached)
    print(f"{'run':<16} {'s':>8} {'new tok/s':>10} {'time vs cache':>14}   (all, s)")
    for name, ts in rows:
        med = statistics.median(ts)
        print(f"{name:<16} {med:8.2f} {args.new / med:10.1f} {med / base:13.2f}x   " + " ".join(f"{t:.2f}" for t in ts))
    print(f"speedup of the KV cache: {statistics.median(nocache) / base:.1f}x")
    if hf is not None:
        peer = statistics.median(hf_times)
        for name, ts in rows[:2] if compiled else rows[:1]:
            rounds = " ".join(f"{h / t:.2f}" for h, t in zip(hf_times, ts))
            print(f"hf generate / {name}: {peer / statistics.median(ts):.2f}x (medians; per round {rounds})")


if __name__ == "__main__":
    main()
