"""Training-step throughput: MiniMindLM vs transformers' LlamaForCausalLM, same weights, one run.

One step = forward + shifted cross-entropy + backward + AdamW update, at the real config
(hidden 512, 8 layers, 8/2 heads, vocab 6400) with B=4, T=640 by default, in float32 and
under bf16 autocast. Contestants:
    ours/manual   the default, hand-written softmax(QK^T/sqrt(d))V
    ours/sdpa     attn_impl="sdpa" (F.scaled_dot_product_attention)
    hf/sdpa       LlamaForCausalLM, transformers' default attention
    hf/eager      LlamaForCausalLM, attn_implementation="eager" (its hand-written path)

Measurements are interleaved (one block of steps per contestant, round-robin, `--repeats`
rounds) so load from other processes hits everyone alike. Reported: each contestant's median
block time, and the median over rounds of its speed ratio to hf/sdpa within the round.

    python benchmarks/bench_lm_train.py --dtypes fp32        # CPU: ~10 minutes on 2 shared cores
    python benchmarks/bench_lm_train.py --dtypes bf16 --device cuda   # bf16 needs bf16 hardware
    python benchmarks/bench_lm_train.py --device cuda --steps 10 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from minimind_v.checkpoint import load_upstream
from minimind_v.config import LMConfig
from minimind_v.lm import lm_loss


def hf_config(cfg: LMConfig, attn: str):
    c = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=True, attention_bias=False,
        mlp_bias=False, hidden_act="silu")
    c._attn_implementation = attn
    return c


def make_step(model, is_hf: bool, ids, dtype, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with autocast:
            if is_hf:
                loss = model(input_ids=ids, labels=ids).loss
            else:
                loss = lm_loss(model(ids), ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


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
    ap.add_argument("--contestants", default="ours/manual,ours/sdpa,hf/sdpa,hf/eager",
                    help="comma-separated subset (hf/sdpa, the baseline, is always run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = LMConfig()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, device {device}, "
          f"threads {torch.get_num_threads()}, B={args.batch} T={args.seq}, "
          f"{args.steps} step(s) x {args.repeats} repeats per contestant")
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    for dtype in args.dtypes.split(","):
        # identical starting weights for everyone: a random Llama, imported into ours
        torch.manual_seed(0)
        ref = transformers.LlamaForCausalLM(hf_config(cfg, "sdpa"))
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        contestants = {}
        for impl in ("manual", "sdpa"):
            m = load_upstream(state, LMConfig(attn_impl=impl)).to(device).train()
            contestants[f"ours/{impl}"] = make_step(m, False, ids, dtype, device)
        for attn in ("sdpa", "eager"):
            h = transformers.LlamaForCausalLM(hf_config(cfg, attn))
            h.load_state_dict(state)
            contestants[f"hf/{attn}"] = make_step(h.to(device).train(), True, ids, dtype, device)
        wanted = set(args.contestants.split(",")) | {"hf/sdpa"}
        contestants = {name: step for name, step in contestants.items() if name in wanted}
        losses = {name: float(step().detach()) for name, step in contestants.items()}   # warmup; same loss?
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
        print(f"\n[{dtype}] first-step loss: " + ", ".join(f"{n} {l:.5f}" for n, l in losses.items()))
        # speed ratio vs hf/sdpa within each round (same load), then the median over rounds
        print(f"{'contestant':<12} {'s/step':>8} {'tokens/s':>10} {'vs hf/sdpa':>11}   (per-round ratios; blocks in s)")
        for name, ts in times.items():
            med = statistics.median(ts)
            ratios = [b / t for b, t in zip(base, ts)]
            print(f"{name:<12} {med:8.3f} {tokens / med:10.0f} {statistics.median(ratios):10.2f}x   "
                  + " ".join(f"{r:.2f}" for r in ratios) + " ; " + " ".join(f"{t:.2f}" for t in ts))
        del contestants


if __name__ == "__main__":
    main()
