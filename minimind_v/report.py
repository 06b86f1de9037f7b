"""The training report: one page (`report.md` + PNGs) instead of reading logs.

Where it sits: at the end of `minimind-v train` and of the demo. From the run directory's
`metrics.jsonl` (and those of earlier stages) and the trained model it draws:

- loss per stage, learning rate, gradient norm and throughput per step (`plots.py`);
- throughput and MFU: tokens/s, images/s, FLOPs per optimizer step (formula below), the
  achieved FLOP/s against a measured matmul peak of this machine (`matmul_peak`);
- with an eval split: exact match per question type with the real pictures and with the
  controls of `evaluation.py` (blank, shuffled, no image, majority), a grid of answers, and
  attention heatmaps: for a few answers, how the attention of the position that produces the
  first answer token spreads over the image patches (averaged over heads and layers), drawn
  over the picture.

FLOPs of one optimizer step (a matmul of an (m x k) by a (k x n) matrix costs 2 m k n):
    forward   2 * N_layers * tokens  +  4 * D * L * pairs  +  2 * D * V * answers  +  2 * Dv * D * patches,
              except the last block's FFN: 2 * N_ffn * answers (training asks for the answer rows only)
    backward  weight gradients (1x a part's forward) where weights learn, input gradients (1x) where
              something below learns or the block itself learns (its RMSNorm gains come first),
              the attention core's 2x wherever a gradient passes; nothing below the lowest learner
    encoder   2 * N_vit * (1 + P) + 4 * Dv * Lv * (1 + P)^2 per image (+ the patch conv), forward
              only, and only when the features are not cached
so with everything trainable it is the familiar 6 * N * tokens + 12 * L * D * T^2 per row.
tokens = B * T (padding included), pairs = B * T^2 (the full square, as usually counted).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .lm import count_parameters
from .plots import draw_bars, draw_chart
from .rundir import METRICS, read_config, read_metrics

REPORT = "report.md"


# ----------------------------------------------------------------------------- FLOPs and the peak
def flops_per_step(cfg, row: dict, trainable: tuple, cached: bool) -> float:
    """FLOPs of one optimizer step from its work counts (a metrics.jsonl row), see the docstring."""
    lm, D = cfg.lm, cfg.lm.hidden_size
    kv = lm.num_kv_heads * lm.head_dim
    attn_part, ffn_part = D * D * 2 + D * kv * 2, 3 * D * lm.intermediate_size   # q, o; k, v | SwiGLU
    L = lm.num_layers
    tokens, pairs, answers = row.get("tokens", 0), row.get("pairs", 0), row.get("targets", 0)
    images = row.get("images", 0)
    P, Dv = getattr(cfg, "num_patches", 0), getattr(cfg, "vision", None)
    proj_trains = "projector" in trainable
    lm_trains = "lm" in trainable
    # backward: weight gradients (1x forward) where weights learn; input gradients (1x) where something
    # below learns, and inside a learning block (its first RMSNorm gain learns, so even q/k/v need
    # them); the attention core (no weights) 2x its forward wherever a gradient passes
    below = proj_trains or lm_trains                                         # the input gradient is needed
    total = 0.0
    for i in range(L):
        learns = lm_trains or ("last_block" in trainable and i == L - 1)
        # the last block's FFN runs at the answer positions only (`MiniMindLM.forward_embeds`)
        ffn_rows = answers if i == L - 1 and not lm.use_moe else tokens
        fwd, attn = 2 * attn_part * tokens + 2 * ffn_part * ffn_rows, 4 * D * pairs
        input_grad = fwd if below or learns else 0
        total += fwd + (fwd if learns else 0) + input_grad + attn * (3 if below or learns else 1)
    head_below = below or "last_block" in trainable
    total += 2 * D * lm.vocab_size * answers * (1 + lm_trains + head_below)   # the head at the answer positions
    if Dv is not None and images:
        total += 2 * Dv.hidden_size * D * images * P * (2 if proj_trains else 1)
        if not cached:
            V, T1 = Dv, 1 + P
            vit = V.num_layers * (4 * V.hidden_size ** 2 + 2 * V.hidden_size * V.intermediate_size)
            conv = 3 * V.patch_size ** 2 * V.hidden_size * P
            total += images * (2 * vit * T1 + 4 * V.hidden_size * V.num_layers * T1 ** 2 + 2 * conv)
    return float(total)


def peak_cache_file() -> Path:
    root = os.environ.get("MINIMIND_V_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minimind_v")
    return Path(root) / "matmul-peak.json"


def matmul_peak(size: int = 1024, repeats: int = 5, device: str = "cpu") -> float:
    """FLOP/s of a timed fp32 torch.matmul of two (size x size) matrices (best of `repeats`), measured
    once per machine, torch version and thread count and cached in `peak_cache_file()`."""
    key = f"{platform.node()}|{platform.machine()}|torch {torch.__version__}|{device}|threads {torch.get_num_threads()}|{size}"
    path = peak_cache_file()
    known = {}
    if path.is_file():
        try:
            known = json.loads(path.read_text())
        except ValueError:
            known = {}
        if key in known:
            return float(known[key])
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.matmul(a, b)                                       # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = 2 * size ** 3 / best
    known[key] = peak
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(known, indent=1))
    os.replace(tmp, path)
    return peak


def throughput(rows: list[dict], cfg, trainable: tuple, cached: bool, peak: float | None = None) -> dict:
    """tokens/s, images/s, FLOPs per step, achieved FLOP/s and MFU over a run's metrics rows."""
    if not rows:
        return {}
    seconds = rows[-1]["time"] - (rows[0]["time"] if len(rows) > 1 else 0.0)
    counted = rows[1:] if len(rows) > 1 else rows           # the first row's time includes its own step
    seconds = max(seconds, 1e-9)
    flops = [flops_per_step(cfg, r, trainable, cached) for r in counted]
    out = {"steps": len(counted), "seconds": seconds,
           "tokens_per_s": sum(r.get("tokens", 0) for r in counted) / seconds,
           "images_per_s": sum(r.get("images", 0) for r in counted) / seconds,
           "flops_per_step": sum(flops) / len(flops), "flops_per_s": sum(flops) / seconds}
    out["peak"] = peak if peak is not None else matmul_peak()
    out["mfu"] = out["flops_per_s"] / out["peak"]
    return out


def throughput_line(t: dict) -> str:
    return (f"throughput: {t['tokens_per_s']:,.0f} tokens/s, {t['images_per_s']:,.1f} images/s, "
            f"{t['flops_per_step'] / 1e9:.3f} GFLOP/step, {t['flops_per_s'] / 1e9:.2f} GFLOP/s = "
            f"{t['mfu']:.1%} MFU of a measured {t['peak'] / 1e9:.1f} GFLOP/s matmul peak")


# ----------------------------------------------------------------------------- attention over the picture
@torch.no_grad()
def image_attention(model, tok, question: str, image_paths: list) -> tuple[torch.Tensor, float]:
    """(heat (g, g) over the first picture's patches, share of all attention on its positions) of
    the position that produces the first answer token, averaged over heads and layers."""
    from .attention import capture_attention
    from .chat import image_settings, load_pixels, prompt_ids, user_message

    ids = prompt_ids(tok, [user_message(question, len(image_paths))], model.cfg.num_patches)
    pixels = load_pixels(image_paths, model.cfg.vision.image_size, **image_settings(model))[None]   # (1, N, 3, S, S)
    with capture_attention(model) as maps:
        model(torch.tensor([ids]), pixel_values=pixels)
    probs = torch.stack([maps[i][0][0, :, -1, :] for i in sorted(maps)])          # (L, H, T)
    row = probs.mean(dim=(0, 1))                                                   # (T,)
    at = [t for t, i in enumerate(ids) if i == tok.image_pad_id][:model.cfg.num_patches]
    g = int(round(model.cfg.num_patches ** 0.5))
    return row[at].reshape(g, g), float(row[at].sum())


def draw_heatmap(picture, heat: torch.Tensor, path: Path, caption: str, size: int = 192) -> None:
    """The picture with the attention over its patches as a red overlay (strongest patch = most red)."""
    from PIL import Image, ImageDraw

    with Image.open(picture) as im:
        base = im.convert("RGB").resize((size, size), Image.NEAREST)
    h = (heat / heat.max().clamp_min(1e-12)).numpy()
    cells = Image.fromarray((h * 255).astype("uint8"), "L").resize((size, size), Image.NEAREST)
    red = Image.new("RGB", (size, size), (255, 0, 0))
    mixed = Image.composite(red, base, cells.point(lambda v: int(v * 0.6)))
    page = Image.new("RGB", (size, size + 18), "white")
    page.paste(mixed, (0, 0))
    ImageDraw.Draw(page).text((3, size + 3), caption[:32], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.save(path)


def save_grid(examples: list, path: Path, columns: int = 4, cell: int = 144) -> None:
    """Test pictures with their question, the reference and the model's answer (green if right)."""
    from PIL import Image, ImageDraw

    rows = (len(examples) + columns - 1) // columns
    text_h = 52
    grid = Image.new("RGB", (columns * cell, max(rows, 1) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (paths, question, ref, pred) in enumerate(examples):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        with Image.open(paths[0]) as im:
            grid.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        draw.text((x + 3, y + cell + 2), question.replace("<image>", "").strip()[:28], fill="black")
        draw.text((x + 3, y + cell + 18), f"model: {pred}"[:28], fill=(0, 130, 0) if pred == ref else (200, 0, 0))
        if pred != ref:
            draw.text((x + 3, y + cell + 34), f"truth: {ref}"[:28], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------- the page
def stage_dirs(run_dir: Path) -> list[Path]:
    """This run and the earlier stages it was initialised from (config.json's "init" chain)."""
    chain, d = [], Path(run_dir)
    while d is not None and (d / "config.json").is_file() and d not in chain:
        chain.append(d)
        init = read_config(d).get("init")
        d = Path(init) if init and Path(init).is_dir() else None
    return chain[::-1]


def write_report(run_dir, model, tok, eval_data=None, eval_images=None, train_data=None, cached: bool = False,
                 stages: list | None = None, results: dict | None = None, heatmaps: int = 4, log=print) -> Path:
    """Write `run_dir/report.md` and its PNGs (`run_dir/report/`); returns the report's path.

    stages: the run directories to chart (default: this one and its --init chain); results: the
    controls of `evaluation.controls` if already computed, else computed here from `eval_data`.
    """
    from .evaluation import controls, table

    run_dir = Path(run_dir)
    fig = run_dir / "report"
    fig.mkdir(parents=True, exist_ok=True)
    stages = [Path(s) for s in (stages or stage_dirs(run_dir))]
    info = read_config(run_dir)
    lines = [f"# Training report: {run_dir.name}", "",
             f"Model: {count_parameters(model):,} parameters; LM hidden {model.cfg.lm.hidden_size} x "
             f"{model.cfg.lm.num_layers} layers; {model.cfg.num_patches} image patches of "
             f"{model.cfg.vision.patch_size} px at {model.cfg.vision.image_size} px; recipe: {info.get('recipe')}; "
             f"init: {info.get('model_init')}.", ""]
    runs = {s.name if s != run_dir else f"{s.name} (this run)": read_metrics(s / METRICS) for s in stages}
    runs = {k: v for k, v in runs.items() if v}
    lines += ["Stages: " + ", ".join(f"{k}: {len(v)} steps, final loss {v[-1]['loss']:.4f}" for k, v in runs.items())
              + ".", ""]
    charts = [("loss", "loss per stage", "loss", True), ("lr", "learning rate", "lr", False),
              ("grad_norm", "gradient norm (before clipping)", "grad_norm", True)]
    offsets, done = {}, 0                                   # stages one after another on the step axis
    for k, v in runs.items():
        offsets[k], done = done, done + v[-1]["step"]
    for key, title, field, log_y in charts:
        draw_chart({k: ([offsets[k] + r["step"] for r in v], [r[field] for r in v]) for k, v in runs.items()},
                   fig / f"{key}.png", title, xlabel="step (all stages)", log_y=log_y)
        lines += [f"![{title}](report/{key}.png)", ""]
    rows = runs.get(f"{run_dir.name} (this run)", [])
    tput = {}
    if len(rows) > 1:
        tok_s = [(b["step"], b.get("tokens", 0) / max(b["time"] - a["time"], 1e-9)) for a, b in zip(rows, rows[1:])]
        draw_chart({"tokens/s": ([s for s, _ in tok_s], [v for _, v in tok_s])}, fig / "throughput.png",
                   "throughput (tokens/s per step)")
        trainable = info.get("trainable") or _trainable_groups(model)
        tput = throughput(rows, model.cfg, tuple(trainable), cached)
        lines += ["![throughput](report/throughput.png)", "", "## Throughput and MFU", "",
                  throughput_line(tput) + ".", "",
                  "FLOPs per step: forward 2 * N_layers * tokens + 4 * D * L * B*T^2 (attention) + 2 * D * V * "
                  "answers (head) + 2 * Dv * D * patches (projector), the last block's FFN at the answers only; backward: weight gradients (1x forward) where "
                  "weights learn, input gradients (1x) where something below learns; the frozen encoder's forward only when not cached "
                  f"({'cached here' if cached else 'not cached here'}). The peak is a timed fp32 torch.matmul "
                  f"(1024 x 1024) with {torch.get_num_threads()} thread(s).", ""]
        log(throughput_line(tput))
    if results is None and eval_data:
        log(f"report: scoring {eval_data} with the controls")
        results = controls(model.eval(), tok, eval_data, eval_images, train_data)
    if results:
        r = results["real"]
        lines += ["## Does it look at the picture?", "", "```", *table(results), "```", ""]
        types = list(r["by_type"])
        series = {m: [results[m]["by_type"][t][0] / results[m]["by_type"][t][1] for t in types]
                  for m in ("real", "blank", "shuffled", "none", "majority", "question") if m in results}
        draw_bars(types, series, fig / "accuracy.png", "exact match per question type, with and without the picture")
        save_grid(r["examples"][:12], fig / "answers.png")
        lines += ["![accuracy](report/accuracy.png)", "", "Answers (green: right):", "",
                  "![answers](report/answers.png)", ""]
        if heatmaps:
            lines += _heatmaps(model, tok, r["examples"], fig, heatmaps)
    path = run_dir / REPORT
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log(f"report: {path}")
    return path


def _trainable_groups(model) -> list[str]:
    from .freeze import model_parts
    parts = model_parts(model)
    groups = [g for g, m in parts.items() if g != "lm" and any(p.requires_grad for p in m.parameters())]
    return groups + (["lm"] if all(p.requires_grad for p in parts["lm"].parameters()) else [])


def _heatmaps(model, tok, examples: list, fig: Path, n: int) -> list[str]:
    """n answers (of the first 32) whose attention fell most on the picture, right answers first."""
    scored = []
    for paths, question, ref, pred in examples[:32]:
        if paths:
            heat, share = image_attention(model, tok, question, paths)
            scored.append((pred == ref, share, heat, paths, question, pred))
    scored.sort(key=lambda x: (not x[0], -x[1]))
    lines = ["## Where the answer looked", "",
             "Attention of the position that produces the first answer token over the image patches, averaged "
             "over heads and layers (red: most attended patch); the share is of all its attention.", ""]
    for i, (right, share, heat, paths, question, pred) in enumerate(scored[:n]):
        draw_heatmap(paths[0], heat, fig / f"attention_{i}.png", f"{pred} ({share:.0%} on image)")
        lines += [f"- {question.replace('<image>', '').strip()} -> **{pred}** ({'right' if right else 'wrong'}; "
                  f"{share:.0%} of the attention on the picture)", f"  ![attention](report/attention_{i}.png)"]
    return lines + [""]
