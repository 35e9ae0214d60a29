"""The demo's parts on a tiny model: side-by-side generations from ONNX folders and the HTML report."""

from __future__ import annotations

import torch

from subfit_fx import demo
from subfit_fx.cli import main
from subfit_fx.zoo import tiny_model
from tests.tiny_tokenizer import tiny_tokenizer


def test_generations_are_the_models_greedy_chat_answers(tmp_path):
    model = tiny_model("llama", layers=2)
    model.save_pretrained(tmp_path / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path / "base")
    assert main(["export", str(tmp_path / "base"), "--out", str(tmp_path / "onnx"), "--kv-cache"]) == 0

    rows = demo._generations({"dense": tmp_path / "onnx"}, tokenizer)
    assert [r["prompt"] for r in rows] == list(demo.PROMPTS)
    for row in rows:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=demo.NEW_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
        assert row["dense"] == expected


def test_report_html_holds_results_and_generations():
    rows = {name: {"params": 10, "sparsity": s, "perplexity": p, "next_token_accuracy": 0.5, "prefill_ms": 2.0,
                   "decode_ms": 1.0, "kv_bytes_per_token": 64, "onnx_mb": 1.0}
            for name, s, p in (("dense", 0.0, 10.0), ("subfit", 0.25, 12.5))}
    generations = [{"prompt": "2 < 3?", "dense": "yes <b>", "subfit": "no"}]
    page = demo._html("setup", rows, generations, ["subfit"], 1.0)
    assert "12.5" in page and '<a href="subfit/report.html">' in page
    assert "yes &lt;b&gt;" in page and "yes <b>" not in page  # model text is escaped
    assert "| dense |" in demo._table(rows) and "**subfit**: 'no'" in demo._side_by_side(generations)
