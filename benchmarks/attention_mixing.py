"""Does token mixing help an attention bypass keep continuation-choice accuracy? A probe on the
*dev* half (never the test half) of wikitext-2 test.txt, on SmolLM2-135M-Instruct.

The attention branches of LAYERS are replaced, everything else kept dense, by one of:
`remove` (zero), `linear` (a full linear map of the branch input z and a bias: the upper bound of
the low-rank bypass the default uses) and `mix` (a full linear map of [z, m, 1] where m is the causal
running mean of z over the positions so far: a cache-free token-mixing regressor, issue 12's
"token-mixing features for attention bypasses"). Fits are ridge least squares (lambda 1e-3 of the
mean Gram diagonal) on the dense model's statistics of 64 x 256 calibration tokens of
wikitext-2 valid.txt. The probe runs the eager transformers model with forward hooks (no graph
surgery: it asks whether the form is worth building, not how it exports).

    python benchmarks/attention_mixing.py [--layers 6 7 8 14 15 18 25 28 29] [--items 200]
        [--forms remove linear mix]

Writes docs/results/attention_mixing.{json,md}. The default LAYERS are the attention branches the
former default SubFit (`subfit:spans=0`) chose at 25 % (quality.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from quality import calibration, eval_split

from subfit_fx.checkpoints import ensure_smollm2
from subfit_fx.data import tokenize_text
from subfit_fx.evaluation import continuation_choice, perplexity_and_accuracy

LAYERS = [6, 7, 8, 14, 15, 18, 25, 28, 29]
RIDGE = 1e-3


def running_mean(z: torch.Tensor) -> torch.Tensor:
    """Causal mean over the positions so far (batch, positions, channels)."""
    n = torch.arange(1, z.shape[1] + 1, dtype=z.dtype, device=z.device).view(1, -1, 1)
    return z.cumsum(1) / n


def features(z: torch.Tensor, form: str) -> torch.Tensor:
    parts = [z, running_mean(z)] if form == "mix" else [z]
    return torch.cat([*parts, torch.ones_like(z[..., :1])], -1)


def branch_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def fit_maps(model: torch.nn.Module, layers: list[int], batches: list) -> dict[tuple[str, int], torch.Tensor]:
    """Ridge maps for the `linear` and `mix` forms of every layer's attention, from one pass."""
    width = model.config.hidden_size
    gram = {i: torch.zeros(2 * width + 1, 2 * width + 1, dtype=torch.float64) for i in layers}
    cross = {i: torch.zeros(2 * width + 1, width, dtype=torch.float64) for i in layers}

    def hook(i: int):
        def observe(module, args, kwargs, out):
            z = features(branch_input(args, kwargs), "mix").reshape(-1, 2 * width + 1).double()
            gram[i].add_(z.T @ z)
            cross[i].add_(z.T @ out[0].reshape(-1, width).double())
        return observe

    handles = [model.model.layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    columns = {"linear": [*range(width), 2 * width], "mix": list(range(2 * width + 1))}
    maps = {}
    for i in layers:
        for form, idx in columns.items():
            g, c = gram[i][idx][:, idx], cross[i][idx]
            g = g + RIDGE * g.diagonal().mean() * torch.eye(len(idx), dtype=g.dtype)
            maps[form, i] = torch.linalg.solve(g, c).float()
    return maps


def install(model: torch.nn.Module, layers: list[int], form: str, maps: dict) -> list:
    def hook(i: int):
        def replace(module, args, kwargs, out):
            z = branch_input(args, kwargs)
            y = torch.zeros_like(out[0]) if form == "remove" else features(z, form) @ maps[form, i]
            return (y, *out[1:])
        return replace
    return [model.model.layers[i].self_attn.register_forward_hook(hook(i), with_kwargs=True) for i in layers]


class Logits(torch.nn.Module):
    """(ids, mask) -> logits, the evaluation functions' calling convention."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits


def markdown(data: dict) -> str:
    dense = data["dense"]
    lines = ["# Token mixing for attention bypasses: a probe (SmolLM2-135M-Instruct, dev half)", "",
             f"Attention branches of layers {data['layers']} replaced (everything else dense); "
             f"{data['eval_tokens']} dev tokens in windows of 256, {data['items']} continuation-choice items. "
             f"Dense: perplexity {dense['perplexity']:.2f}, choice accuracy {dense['choice_accuracy']:.3f}.", "",
             "| form | perplexity / dense | next-token | choice acc. | evaluate s |", "|---|---:|---:|---:|---:|"]
    for form, r in data["forms"].items():
        lines.append(f"| {form} | {r['perplexity'] / dense['perplexity']:.3f} | {r['next_token_accuracy']:.3f} "
                     f"| {r['choice_accuracy']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n\n" + data["reading"] + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", nargs="+", type=int, default=LAYERS)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--forms", nargs="+", choices=["remove", "linear", "mix"], default=["remove", "linear", "mix"])
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    transformers.logging.set_verbosity_error()
    model_dir = ensure_smollm2()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    maps = fit_maps(model, args.layers, calibration(tokenizer, 64, 256))
    text = eval_split("dev")
    ids = tokenize_text(text, tokenizer)[:args.eval_tokens]
    wrapped = Logits(model)

    def evaluate() -> dict:
        start = time.perf_counter()
        out = perplexity_and_accuracy(wrapped, ids, 256, 8, progress=False)
        out["choice_accuracy"] = continuation_choice(wrapped, tokenizer, text, args.items, 0, max_len=256,
                                                     progress=False)
        return {**out, "seconds": time.perf_counter() - start}

    dense = evaluate()
    forms = {}
    for form in args.forms:
        handles = install(model, args.layers, form, maps)
        forms[form] = evaluate()
        for h in handles:
            h.remove()
    best = min(forms, key=lambda f: forms[f]["perplexity"])
    reading = (f"Lowest perplexity: `{best}`. Choice accuracy: "
               + ", ".join(f"{f} {r['choice_accuracy']:.3f}" for f, r in forms.items()) + ".")
    data = {"layers": args.layers, "items": args.items, "eval_tokens": args.eval_tokens, "ridge": RIDGE,
            "dense": dense, "forms": forms, "reading": reading}
    write_results("attention_mixing", data, markdown(data))


if __name__ == "__main__":
    main()
