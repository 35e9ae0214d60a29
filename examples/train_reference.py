"""Train the reference model that subfit_fx's quality benchmarks compress.

A Llama-architecture decoder (8 layers, hidden 256, 6.85M parameters) with a byte-level BPE
tokenizer, trained from scratch on wikitext-2 valid.txt. wikitext-2 test.txt is held out: the
script ends by printing perplexity on its first 50k tokens. About 40-45 minutes on one CPU thread.

Example:
    nohup .venv/bin/python examples/train_reference.py --threads 1 \\
        > .cache/reference_train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import transformers as tf
from training import REFERENCE_DEFAULTS, heldout_perplexity, train_reference_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared/data"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    d = REFERENCE_DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA / "wikitext-2/valid.txt",
                   help="training text (default: %(default)s)")
    p.add_argument("--eval-data", type=Path, default=DATA / "wikitext-2/test.txt",
                   help="held-out text, never trained on (default: %(default)s)")
    p.add_argument("--out", type=Path, default=REPO / ".cache/reference",
                   help="output model directory (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; 1 leaves the other cores free")
    p.add_argument("--steps", type=int, default=d["steps"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--seq-len", type=int, default=d["seq_len"])
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--eval-tokens", type=int, default=50_000,
                   help="held-out tokens scored at the end, in non-overlapping windows")
    p.add_argument("--monitor-every", type=int, default=100,
                   help="log perplexity on the tail of --eval-data every N steps (0: off)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.data.resolve() == args.eval_data.resolve():
        print("error: --data is the held-out evaluation text", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"training on {args.data} -> {args.out} ({args.threads} thread(s))", flush=True)
    out = train_reference_model(
        args.out, train_file=args.data, eval_file=args.eval_data, threads=args.threads,
        progress=not args.no_progress, monitor_every=args.monitor_every, steps=args.steps,
        batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
    )

    record_path = out / "training.json"
    record = json.loads(record_path.read_text())
    print(f"final train loss: {record['final_train_loss']:.4f} "
          f"(last step {record['final_loss']:.4f}; {record['wall_time_s'] / 60:.1f} min)",
          flush=True)

    if not args.eval_data.is_file():
        print(f"held-out text not found, skipping perplexity: {args.eval_data}", flush=True)
        return 0
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    tokenizer = tf.AutoTokenizer.from_pretrained(out)
    ppl = heldout_perplexity(model, tokenizer, args.eval_data.read_text(encoding="utf-8"),
                             max_tokens=args.eval_tokens, seq_len=args.seq_len)
    print(f"held-out perplexity ({args.eval_data.name}, first {args.eval_tokens} tokens, "
          f"windows of {args.seq_len}): {ppl:.2f}", flush=True)

    # Kept with the model so benchmarks can compare a compressed model against it.
    record["heldout"] = {"file": str(args.eval_data), "tokens": args.eval_tokens,
                         "seq_len": args.seq_len, "perplexity": ppl}
    tmp = record_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, record_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
