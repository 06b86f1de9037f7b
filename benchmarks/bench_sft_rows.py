"""Training-step time when the last block's FFN runs on the loss rows only, against the former
path (the last block in full, the rows taken after it), same weights, same batches, one run.

`MiniMindLM.forward_embeds(..., logits_at=...)` runs the last block's attention over every position
and its FFN only on the K positions whose next token is a label. The former path is selected here
by hiding the reference block from that check (`lm._BLOCK_FORWARD`), which makes the last block run
in full as any other block class would. A step = forward from cached image features (projector +
splice + LM), cross-entropy at the label positions, backward, clip, fused AdamW (`train.py`'s step).

Shapes:
- `demo`: the demo's SFT batches (`minimind-v demo`): the demo model (hidden 128, 2 layers, 9 image
  tokens), B=64 rows of T=28 tokens, 2-3 answer tokens each;
- `real`: MiniMind2-V's SFT shape: the real config, B=2, T=1536, 40% of each row answers.

    python benchmarks/bench_sft_rows.py --threads 1 --repeats 5
    python benchmarks/bench_sft_rows.py --shapes real --threads 2 --repeats 3 --steps 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from minimind_v import lm
from minimind_v.config import VLMConfig
from minimind_v.demo import demo_config
from minimind_v.freeze import apply_freeze, param_groups
from minimind_v.recipes import ModelInit, apply_init, get, init_for, resolve
from minimind_v.train import forward_loss
from minimind_v.vlm import MiniMindVLM


def build(shape: str, g: torch.Generator):
    """(model, batches): a model with the recipe's init and batches shaped like `shape`'s."""
    torch.manual_seed(0)
    if shape == "demo":
        recipe = get("from-scratch-small")
        cfg = demo_config(627, 3, recipe)
        model = MiniMindVLM(cfg)
        apply_init(model, resolve(ModelInit, init_for(recipe, cfg.vision.stem), {})[0], log=lambda m: None)
        B, T, answer = 64, 28, (2, 4)                     # 2-3 answer tokens at the end of each row
    else:
        cfg = VLMConfig()
        model = MiniMindVLM(cfg)
        B, T, answer = 2, 1536, (int(0.4 * 1536), int(0.4 * 1536) + 1)
    apply_freeze(model, ("lm", "projector"))
    P, Dv = cfg.num_patches, cfg.vision.hidden_size
    batches = []
    for _ in range(4):
        ids = torch.randint(10, cfg.lm.vocab_size, (B, T), generator=g)
        ids[:, 4:4 + P] = cfg.image_pad_id                 # one picture per row, after the question
        labels = torch.full_like(ids, -100)
        for b in range(B):
            n = int(torch.randint(*answer, (1,), generator=g))
            labels[b, T - n - 1:T - 1] = ids[b, T - n - 1:T - 1]
        batches.append({"input_ids": ids, "labels": labels,
                        "image_features": torch.randn(B, 1, P, Dv, generator=g)})
    return model, batches


def run_steps(model, opt, params, batches, steps: int) -> tuple[float, list[float]]:
    losses = []
    t = time.perf_counter()
    for i in range(steps):
        loss, _ = forward_loss(model, batches[i % len(batches)], torch.device("cpu"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return (time.perf_counter() - t) / steps, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="demo", help="comma-separated: demo, real")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="round-robin blocks per contestant")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per block")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    reference = lm._BLOCK_FORWARD
    for shape in a.shapes.split(","):
        g = torch.Generator().manual_seed(0)
        model, batches = build(shape, g)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        contestants = {"rows": reference, "full last block": None}
        runs = {}
        # one optimizer each (its own moments) over the same Parameter objects, from the same weights
        for name, fwd in contestants.items():
            model.load_state_dict(start)
            lm._BLOCK_FORWARD = fwd
            params = [q for q in model.parameters() if q.requires_grad]
            opt = torch.optim.AdamW(param_groups(model, 0.01, 1.0), lr=1e-3, fused=True)
            _, first = run_steps(model, opt, params, batches, 1)     # warm-up, and the first loss
            runs[name] = dict(state={k: v.clone() for k, v in model.state_dict().items()},
                              opt=opt, first=first[0], times=[])
        lm._BLOCK_FORWARD = reference
        for _ in range(a.repeats):
            for name, fwd in contestants.items():
                r = runs[name]
                model.load_state_dict(r["state"])
                lm._BLOCK_FORWARD = fwd
                params = [q for q in model.parameters() if q.requires_grad]
                sec, _ = run_steps(model, r["opt"], params, batches, a.steps)
                r["state"] = {k: v.clone() for k, v in model.state_dict().items()}
                r["times"].append(sec)
        lm._BLOCK_FORWARD = reference
        B, T = batches[0]["input_ids"].shape
        first = [r["first"] for r in runs.values()]
        print(f"[{shape}] B={B} T={T}; first-step loss {first[0]:.6f}, the two paths differ by "
              f"{abs(first[0] - first[1]):.1e}")
        base = runs["full last block"]["times"]
        print(f"{'contestant':<18} {'ms/step':>8} {'vs full':>8}   (per-round ratios)")
        for name, r in runs.items():
            ratios = [b / t for b, t in zip(base, r["times"])]
            print(f"{name:<18} {1e3 * statistics.median(r['times']):8.1f} {statistics.median(ratios):7.2f}x   "
                  + " ".join(f"{x:.2f}" for x in ratios))


if __name__ == "__main__":
    main()
