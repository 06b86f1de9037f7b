"""Training-step throughput: MiniMindLM vs transformers' LlamaForCausalLM, same weights, one run.

One step = forward + shifted cross-entropy + backward + AdamW update, at the real config
(hidden 512, 8 layers, 8/2 heads, vocab 6400) with B=4, T=640 by default, in float32 and
under bf16 autocast. Contestants:
    ours/manual   the default model through the plain API: lm_loss(model(ids), ids) (on a CPU its
                  RMSNorm is the fused kernels/ op: norm_impl="auto")
    ours/eagernorm  the same with norm_impl="eager" (RMSNorm from raw torch ops)
    ours/fnorm    the same with norm_impl="fused" (the kernels/ RMSNorm op, on every device)
    ours/chunkce  the default model with chunked_lm_loss (the head's loss chunk by chunk, no logits)
    ours/fast     both: norm_impl="fused" + chunked_lm_loss
    ours/compiled torch.compile(ours/fast's model) (with --compile; its compile time is not timed)
    ours/compiled-plain  torch.compile(fullgraph) of ours/manual's forward + loss, lm_loss(model(ids), ids)
                  (with --compile, or by name in --contestants; the first step, compiling, is not timed)
    ours/sdpa     attn_impl="sdpa" (F.scaled_dot_product_attention), plain API
    hf/sdpa       LlamaForCausalLM, transformers' default attention
    hf/eager      LlamaForCausalLM, attn_implementation="eager" (its hand-written path)
    upstream      upstream MiniMind's own model code (model/model_minimind.py of a local copy of its
                  repository, --upstream-repo DIR) at the same sizes; its current code adds an
                  RMSNorm on q and k (so its loss differs slightly), loaded with the shared weights
Every contestant uses the same optimizer (--adamw: fused by default, as train.py).

Measurements are interleaved (one block of steps per contestant, round-robin, `--repeats`
rounds) so load from other processes hits everyone alike. Reported: each contestant's median
block time, and the median over rounds of its speed ratio to hf/sdpa within the round.

    python benchmarks/bench_lm_train.py --dtypes fp32 --threads 1   # CPU: ~10 minutes on 2 shared cores
    python benchmarks/bench_lm_train.py --dtypes fp32 --upstream-repo /tmp/upstream_minimind
    python benchmarks/bench_lm_train.py --dtypes bf16 --device cuda   # bf16 needs bf16 hardware
    python benchmarks/bench_lm_train.py --device cuda --steps 10 --repeats 5
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.lm import chunked_lm_loss, lm_loss
from minimind_v.report import flops_per_step


def hf_config(cfg: LMConfig, attn: str):
    c = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, hidden_act="silu")
    c._attn_implementation = attn
    return c


def make_optimizer(params, kind: str):
    return torch.optim.AdamW(params, lr=1e-4, **{"fused": dict(fused=True), "foreach": dict(foreach=True),
                                                  "loop": dict(foreach=False)}[kind])


def make_step(model, kind: str, ids, dtype, device, adamw: str):
    """kind: "hf" (model(input_ids, labels).loss), "plain" (lm_loss(model(ids))), "chunked",
    "compiled-plain" (the plain forward + loss through torch.compile, one graph)."""
    opt = make_optimizer(model.parameters(), adamw)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    compiled = torch.compile(lambda x: lm_loss(model(x), x), fullgraph=True) if kind == "compiled-plain" else None

    def step():
        with autocast:
            if kind == "hf":
                loss = model(input_ids=ids, labels=ids).loss
            elif kind == "chunked":
                loss = chunked_lm_loss(model, ids, ids)
            elif compiled is not None:
                loss = compiled(ids)
            else:
                loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def upstream_model(repo: str, cfg: LMConfig, state: dict):
    """Upstream MiniMind's MiniMindForCausalLM from DIR/model/model_minimind.py at our sizes."""
    path = Path(repo) / "model" / "model_minimind.py"
    if not path.exists():
        sys.exit(f"--upstream-repo: {path} not found (expected a copy of upstream MiniMind's repository)")
    spec = importlib.util.spec_from_file_location("upstream_model_minimind", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ucfg = mod.MiniMindConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                              intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                              rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
                              max_position_embeddings=cfg.max_seq_len, flash_attn=True)
    model = mod.MiniMindForCausalLM(ucfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    extra = sorted({k.split(".")[-2] for k in missing if "norm" in k})
    print(f"upstream: {path}; keys of its own (left at their init): {extra or 'none'}; "
          f"unused of ours: {len(unexpected)}")
    return model


PRODUCTS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::addbmm")


def products_seconds(step) -> float:
    """Seconds one step spends inside the matrix-product kernels (CPU: their self time under the
    profiler), the part of a step that every contestant running the same products shares."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCTS) / 1e6


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=640)
    ap.add_argument("--steps", type=int, default=1, help="timed steps per block")
    ap.add_argument("--repeats", type=int, default=3, help="blocks per contestant (median reported)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--contestants", default="ours/manual,ours/eagernorm,ours/fnorm,ours/chunkce,ours/fast,ours/sdpa,hf/sdpa,hf/eager",
                    help="comma-separated subset (hf/sdpa, the baseline, is always run)")
    ap.add_argument("--adamw", choices=("fused", "foreach", "loop"), default="fused",
                    help="AdamW implementation, the same for every contestant")
    ap.add_argument("--compile", action="store_true", help="add ours/compiled (torch.compile of ours/fast)")
    ap.add_argument("--upstream-repo", default=None, help="a local copy of upstream MiniMind's repository")
    ap.add_argument("--products", action="store_true",
                    help="CPU: profile one more step of each of ours and print the time in matrix products, "
                         "and from it the largest ratio to hf/sdpa that such a step could reach")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's dense peak for the dtype (e.g. 989 for an H100/H200 in bf16): prints MFU")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LMConfig()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, B={args.batch} T={args.seq}, "
          f"{args.steps} step(s) x {args.repeats} repeats per contestant, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    for dtype in args.dtypes.split(","):
        # identical starting weights for everyone: a random Llama, imported into ours
        torch.manual_seed(0)
        ref = transformers.LlamaForCausalLM(hf_config(cfg, "sdpa"))
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        wanted = set(args.contestants.split(",")) | {"hf/sdpa"}
        if args.compile:
            wanted |= {"ours/compiled", "ours/compiled-plain"}
        if args.upstream_repo:
            wanted.add("upstream")
        ours = {"ours/manual": ("manual", "auto", "plain"), "ours/eagernorm": ("manual", "eager", "plain"),
                "ours/fnorm": ("manual", "fused", "plain"),
                "ours/chunkce": ("manual", "auto", "chunked"), "ours/fast": ("manual", "fused", "chunked"),
                "ours/compiled": ("manual", "fused", "chunked"), "ours/sdpa": ("sdpa", "auto", "plain"),
                "ours/compiled-plain": ("manual", "auto", "compiled-plain")}
        contestants = {}
        for name, (impl, norm, loss) in ours.items():
            if name in wanted:
                m = load_upstream(state, LMConfig(attn_impl=impl, norm_impl=norm)).to(device).train()
                if name == "ours/compiled":
                    m = torch.compile(m)
                contestants[name] = make_step(m, loss, ids, dtype, device, args.adamw)
        for attn in ("sdpa", "eager"):
            if f"hf/{attn}" in wanted:
                h = transformers.LlamaForCausalLM(hf_config(cfg, attn))
                h.load_state_dict(state)
                contestants[f"hf/{attn}"] = make_step(h.to(device).train(), "hf", ids, dtype, device, args.adamw)
        if "upstream" in wanted:
            u = upstream_model(args.upstream_repo, cfg, state).to(device).train()
            contestants["upstream"] = make_step(u, "hf", ids, dtype, device, args.adamw)
        t0 = time.perf_counter()
        losses = {}
        for name, step in contestants.items():                     # warmup (and compile); same loss?
            losses[name] = float(step().detach())
            sync(device)
            print(f"  first step of {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            t0 = time.perf_counter()
        times = {name: [] for name in contestants}
        for _ in range(args.repeats):
            for name, step in contestants.items():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(device)
                times[name].append((time.perf_counter() - t0) / args.steps)
        tokens = args.batch * args.seq
        base = times["hf/sdpa"]
        # FLOPs of the step as report.py counts them (every linear fwd + 2x bwd, the attention pairs, the head)
        flops = flops_per_step(SimpleNamespace(lm=cfg), {"tokens": tokens, "pairs": args.batch * args.seq ** 2,
                                                          "targets": tokens}, ("lm",), cached=True)
        print(f"\n[{dtype}] {flops / 1e9:.1f} GFLOP/step; AdamW {args.adamw}; first-step loss: " + ", ".join(f"{n} {l:.5f}" for n, l in losses.items()))
        # speed ratio vs hf/sdpa within each round (same load), then the median over rounds
        print(f"{'contestant':<19} {'s/step':>8} {'tokens/s':>10} {'vs hf/sdpa':>11}   (per-round ratios; blocks in s)")
        for name, ts in times.items():
            med = statistics.median(ts)
            ratios = [b / t for b, t in zip(base, ts)]
            mfu = f"  MFU {flops / med / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
            print(f"{name:<19} {med:8.3f} {tokens / med:10.0f} {statistics.median(ratios):10.2f}x{mfu}   "
                  + " ".join(f"{r:.2f}" for r in ratios) + " ; " + " ".join(f"{t:.2f}" for t in ts), flush=True)
        if "upstream" in times:              # the model a user would otherwise train
            for name, ts in times.items():
                if name.startswith("ours/"):
                    r = [u / t for u, t in zip(times["upstream"], ts)]
                    print(f"  {name} vs upstream: {statistics.median(r):.2f}x (per round "
                          + " ".join(f"{x:.2f}" for x in r) + ")", flush=True)
        if args.products and device.type == "cpu":
            # a step is at least its matrix products: hf/sdpa's time over them bounds any speed-up
            for name, step in contestants.items():
                if name.startswith("ours/") and "compiled" not in name:
                    p = products_seconds(step)
                    share = p / statistics.median(times[name])
                    print(f"  {name}: {p:.3f} s in matrix products ({share:.0%} of its step); with everything else "
                          f"free it would be {statistics.median(base) / p:.2f}x hf/sdpa", flush=True)
        del contestants


if __name__ == "__main__":
    main()
