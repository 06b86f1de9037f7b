"""The `minimind-v` command (also `python -m minimind_v`).

Each subcommand lives beside the code it drives: the module exposes a function that takes
the remaining command-line words, parses them with its own argparse parser, and returns an
exit code. This file only maps names to those functions, importing a module when it is used,
so `minimind-v --help` stays fast and a subcommand's dependencies load only when needed.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback

# subcommand -> (module, function, one-line help)
COMMANDS = {
    "demo": ("minimind_v.demo", "cli", "train a small VLM end to end on generated shapes and show its answers"),
    "train": ("minimind_v.train_cli", "cli", "pretrain or SFT a model (see `minimind-v train --help`)"),
    "chat": ("minimind_v.chat", "cli_chat", "talk to a checkpoint about an image (streams the answer)"),
    "serve": ("minimind_v.serve", "cli", "chat with a checkpoint about a picture in the browser (and a JSON API)"),
    "eval": ("minimind_v.evaluation", "cli", "exact match on a held-out JSONL split, with blank/shuffled/no-image "
                                             "controls"),
    "model-config": ("minimind_v.recipes", "cli_model_config", "write a small model config for a tokenizer and "
                                                              "an image size"),
    "tokenizer": ("minimind_v.tokenizer", "cli", "train or inspect a sentencepiece tokenizer"),
    "data": ("minimind_v.synthetic", "cli", "generate a dataset: `data synth` (shapes), `data scenes` (glyphs, relations), `data objects` (free objects, relations)"),
    "import-upstream": ("minimind_v.upstream", "cli", "turn upstream MiniMind / MiniMind-V release files into a checkpoint directory"),
    "convert-clip": ("minimind_v.clip_weights", "cli", "convert CLIP vision weights (any format) to a plain state dict"),
    "lessons": ("minimind_v.lesson_progress", "cli", "your progress through lessons/ (`lessons check NN` grades one)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: minimind-v COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "`minimind-v COMMAND --help` shows a command's options; --debug (or MINIMIND_V_DEBUG=1)",
              "shows the traceback of an error. --learner (any command, e.g. `demo --learner`) builds the",
              "model from your lessons/*/exercise.py wherever they pass their tests (see `minimind-v lessons`)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minimind-v: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    debug = "--debug" in rest or os.environ.get("MINIMIND_V_DEBUG", "") not in ("", "0")
    learner = "--learner" in rest
    rest = [x for x in rest if x not in ("--debug", "--learner")]
    module_name, func_name, _ = COMMANDS[name]
    try:
        if learner:                # before the command imports anything: your code in the model
            from .learner import activate
            activate()
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except KeyboardInterrupt:
        print(f"minimind-v {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Errors that bad input causes (bad data, bad files, bad arguments, a run directory in
        # use): one message on stderr naming the file/line/key, exit status 2 (1 when training
        # stopped itself). A traceback only with --debug or MINIMIND_V_DEBUG=1. Anything else is
        # a bug and keeps its traceback.
        from .rundir import RunDirError
        from .train_state import TrainingError
        if not isinstance(e, (ValueError, OSError, RunDirError, TrainingError)):
            raise
        if debug:
            traceback.print_exc()
        print(f"minimind-v {name}: {e}", file=sys.stderr)
        return 1 if isinstance(e, TrainingError) else 2


if __name__ == "__main__":
    raise SystemExit(main())
