"""The `export`, `generate` and `bench` subcommands of `subfit-fx`.

`subfit_fx.cli` loads this module through its `COMMAND_MODULES` list and calls `register`;
heavy libraries load only when a command runs, so `subfit-fx --help` stays fast.

Example:
    >>> from subfit_fx.cli import main
    >>> main(["export", "builtin:llama", "--out", "out/llama.onnx", "--kv-cache"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from subfit_fx.atomic import atomic_dir, check_not_input, claim
from subfit_fx.cli_types import positive_int
from subfit_fx.errors import InputError, OutputExistsError
from subfit_fx.schema import dumps

__all__ = ["COMMANDS", "ONNX_IN_FOLDER", "cmd_bench", "cmd_export", "cmd_generate", "finish_folder", "onnx_file",
           "register"]

ONNX_IN_FOLDER = "model.onnx"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _mib(size: int) -> str:
    return f"{size / 2**20:.2f} MiB"


def cmd_export(args: argparse.Namespace) -> int:
    """`subfit-fx export MODEL_OR_DIR --out FILE.onnx [--kv-cache] [--optimize] [--quantize int8|int4] [--opset N]`.

    Each stage is validated (export and fusions against torch within 1e-4; quantization reported);
    only the last stage writes `--out`, earlier ones go to a temporary folder.

    Example:
        >>> cmd_export(build_parser().parse_args(["export", "builtin:gpt2", "--out", "g.onnx"]))  # doctest: +SKIP
        0
    """
    from subfit_fx.exporters.kv_cache import export_onnx_kv
    from subfit_fx.exporters.onnx_export import OPSET, check_opset, export_onnx
    from subfit_fx.exporters.postprocess import optimize_onnx, quantize_int4, quantize_int8
    from subfit_fx.exporters.sources import load_source

    opset = OPSET if args.opset is None else check_opset(args.opset)
    out = Path(args.out)
    folder = out.suffix != ".onnx"  # a folder: model.onnx with config, tokenizer, generation config
    inputs = [args.model] if Path(args.model).exists() else []
    check_not_input(out, inputs)
    if out.exists() and not args.force:
        raise OutputExistsError(f"'{out}' exists; pass --force to overwrite it")
    if folder and out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file; an ONNX folder needs a directory path (or end --out in .onnx)")
    passes: list[tuple[str, Any]] = []
    if args.optimize:
        passes.append(("optimize", lambda s, d: optimize_onnx(s, d, force=True)))
    if args.quantize == "int8":
        passes.append(("int8", lambda s, d: quantize_int8(s, d, force=True)))
    elif args.quantize == "int4":
        passes.append(("int4", lambda s, d: quantize_int4(s, d, force=True)))
    src = load_source(args.model)
    kind = "KV-cache" if args.kv_cache else "plain"
    _say(f"exporting {args.model} ({kind}{', compressed' if src.recipe is not None else ''}) to {out}")
    exporter = export_onnx_kv if args.kv_cache else export_onnx
    if folder:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(out, force=args.force) as staging:
            result = _run_stages(exporter, src, passes, staging / ONNX_IN_FOLDER, opset)
            finish_folder(src, Path(args.model), staging, args.kv_cache)
        written = out / ONNX_IN_FOLDER
    else:
        result = _run_stages(exporter, src, passes, out, opset, force=args.force)
        written = out
    from subfit_fx.exporters.artifacts import model_bytes

    print(f"wrote {out} ({_mib(model_bytes(written))}; inputs {', '.join(result.inputs)})")
    return 0


def _run_stages(exporter: Any, src: Any, passes: list[tuple[str, Any]], out: Path, opset: int,
                force: bool = True) -> Any:
    """Export, then each pass; each stage is validated, only the last one writes `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out), tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=".partial", dir=out.parent) as tmp:
        stages = [Path(tmp) / f"stage{i}.onnx" for i in range(len(passes))] + [out]
        result = exporter(src, stages[0], force=force, opset=opset)
        _say(f"  export: {result.parity.summary()}")
        path = stages[0]
        for (name, run), dst in zip(passes, stages[1:]):
            step = run(path, dst)
            extra = step.details.get("fused_ops") or ""
            _say(f"  {name}: {step.parity.summary()} {extra}".rstrip())
            path = dst
    return result


def finish_folder(src: Any, model_arg: Path, folder: Path, kv_cache: bool) -> None:
    """Complete an ONNX folder around its model.onnx: the source's config.json (and
    modeling_subfit.py, which a compressed config names), generation config and tokenizer files;
    for a KV-cache graph, caches numbered for onnxruntime-genai and its genai_config.json.

    Example:
        >>> finish_folder(load_source("builtin:llama"), Path("builtin:llama"), Path("out"), True)  # doctest: +SKIP
    """
    _write_folder_files(src, model_arg, folder)
    if not kv_cache:
        return
    from subfit_fx.exporters.genai import cache_heads, renumber_cache, write_genai_config

    cached = renumber_cache(folder / ONNX_IN_FOLDER)
    model = src.model
    generation = getattr(model, "generation_config", None)
    heads = cache_heads(folder / ONNX_IN_FOLDER)
    if len(set(heads)) > 1:  # key/value groups pruned unevenly: genai_config.json has one head count
        _say("  onnxruntime-genai: no genai_config.json (layers have different numbers of key/value heads, "
             f"{min(heads)}-{max(heads)}; genai takes one); run the model with onnxruntime or optimum")
    elif model is not None and write_genai_config(folder, model.config, cached, generation,
                                                  kv_heads=heads[0] if heads else None):
        _say(f"  onnxruntime-genai: genai_config.json ({cached} cached layers)")


def _write_folder_files(src: Any, model_arg: Path, folder: Path) -> None:
    from subfit_fx.standalone import copy_model_files

    directory = model_arg if model_arg.is_dir() else None
    for name in ("config.json", "modeling_subfit.py"):
        if directory is not None and (directory / name).is_file():
            shutil.copy2(directory / name, folder / name)
    model = src.model
    if not (folder / "config.json").is_file() and model is not None and hasattr(model, "config"):
        model.config.save_pretrained(folder)
    for source_dir in (directory, src.tokenizer_dir):
        if source_dir is not None:
            copy_model_files(Path(source_dir), folder)
    if (not (folder / "generation_config.json").is_file() and model is not None
            and getattr(model, "generation_config", None) is not None and model.can_generate()):
        model.generation_config.save_pretrained(folder)


def onnx_file(path: str | Path) -> Path:
    """The ONNX file of a `subfit-fx export` output: the file itself, or a folder's model.onnx.

    Example:
        >>> onnx_file("model.onnx")
        PosixPath('model.onnx')
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ONNX_IN_FOLDER).is_file():
            raise InputError(f"folder '{path}' holds no {ONNX_IN_FOLDER}; pass a folder written by "
                             "'subfit-fx export MODEL --out FOLDER' or an .onnx file")
        return path / ONNX_IN_FOLDER
    return path


def _tokenizer(args: argparse.Namespace, metadata: dict[str, str], vocab: int) -> Any:
    from subfit_fx.data import ByteTokenizer
    from subfit_fx.exporters.sources import tokenizer_dir
    from subfit_fx.onnx_format import SOURCE_KEY, TOKENIZER_KEY

    # an ONNX folder carries its tokenizer; a bare file names the directory it was exported from
    own = tokenizer_dir(Path(args.onnx)) if Path(args.onnx).is_dir() else None
    directory = args.tokenizer or own or metadata.get(TOKENIZER_KEY)
    if directory:
        if not Path(directory).is_dir():
            raise InputError(f"tokenizer directory '{directory}' does not exist; pass --tokenizer DIR")
        from subfit_fx.data import tokenizer_from_dir

        return tokenizer_from_dir(directory)
    if metadata.get(SOURCE_KEY, "").startswith("builtin:"):
        return ByteTokenizer(vocab)  # built-in random models have no tokenizer: bytes stand in
    raise InputError(f"'{args.onnx}' does not name its tokenizer; pass --tokenizer DIR (the model directory) "
                     "or export to a folder")


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if hasattr(tokenizer, "decode"):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def cmd_generate(args: argparse.Namespace) -> int:
    """`subfit-fx generate FILE.onnx --prompt TEXT [--tokenizer DIR] [--max-new-tokens N]`.

    Example:
        >>> cmd_generate(build_parser().parse_args(["generate", "m.onnx", "--prompt", "hi"]))  # doctest: +SKIP
        0
    """
    from subfit_fx.runtime import VOCAB_KEY, OnnxCausalLM, providers_for

    lm = OnnxCausalLM(onnx_file(args.onnx), threads=args.threads, providers=providers_for(args.provider))
    vocab = int(lm.metadata.get(VOCAB_KEY, 256))
    tokenizer = _tokenizer(args, lm.metadata, vocab)
    prompt = tokenizer(args.prompt)["input_ids"]
    if not prompt:
        raise InputError("--prompt is empty after tokenization; pass some text")
    context = _context(lm.metadata)
    new_tokens = args.max_new_tokens
    if context is not None:
        if len(prompt) >= context:
            raise InputError(f"--prompt has {len(prompt)} tokens, but the model's context is {context}; "
                             "shorten the prompt")
        if len(prompt) + new_tokens > context:
            new_tokens = context - len(prompt)
            _say(f"subfit-fx: note: generating {new_tokens} tokens, not {args.max_new_tokens}: the prompt "
                 f"({len(prompt)}) and the new tokens fill the model's context of {context}")
    ids = lm.generate([prompt], new_tokens, do_sample=args.temperature > 0,
                      temperature=args.temperature or 1.0, top_k=args.top_k, seed=args.seed,
                      eos_token_id=getattr(tokenizer, "eos_token_id", None))
    new = [int(i) for i in ids[0, len(prompt):]]
    # decode prompt and continuation together (a continuation decoded alone loses the space
    # between words) and print the user's prompt followed by what the model added
    head, full = _decode(tokenizer, list(prompt)), _decode(tokenizer, list(prompt) + new)
    print(args.prompt + full[len(head):] if full.startswith(head) else full)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """`subfit-fx bench DENSE.onnx COMPRESSED.onnx [--json]`: interleaved timings, medians, ratio.

    Both files are timed at each `--seq` (prefill, or the plain forward) and, for KV-cache graphs,
    one decode step at past length `--seq`.

    Example:
        >>> cmd_bench(build_parser().parse_args(["bench", "a.onnx", "b.onnx", "--json"]))  # doctest: +SKIP
        0
    """
    from subfit_fx.exporters.artifacts import model_bytes
    from subfit_fx.exporters.bench import decode_step, interleaved, kv_bytes_per_token, prefill_step
    from subfit_fx.onnx_format import KIND_KEY
    from subfit_fx.runtime import OnnxCausalLM, OnnxRunner, create_session, model_metadata, providers_for

    providers = providers_for(args.provider)  # before any work: a missing CUDA provider is one line
    paths = {"dense": onnx_file(args.dense), "compressed": onnx_file(args.compressed)}
    metadata = {name: model_metadata(create_session(p, threads=1)) for name, p in paths.items()}
    kinds = {name: meta.get(KIND_KEY) for name, meta in metadata.items()}
    if len(set(kinds.values())) != 1:
        raise InputError(f"compare like with like: {paths['dense']} is {kinds['dense']}, "
                         f"{paths['compressed']} is {kinds['compressed']}")
    kv = kinds["dense"] == "kv-cache"
    for name, meta in metadata.items():
        context = _context(meta)
        if context is not None and max(args.seq) + kv > context:
            raise InputError(f"--seq {max(args.seq)} is beyond the context of {paths[name]} ({context} tokens"
                             f"{'; a decode step after it needs one more' if kv else ''}); use --seq up to "
                             f"{context - kv}")
    runner = OnnxCausalLM if kv else OnnxRunner
    models = {name: runner(p, threads=args.threads, providers=providers) for name, p in paths.items()}
    rows = []
    for seq in args.seq:
        stages = [("prefill" if kv else "forward", lambda m, s=seq: prefill_step(m, s))]
        if kv:
            stages.append(("decode", lambda m, s=seq: decode_step(m, s)))
        for stage, make in stages:
            times = interleaved({name: make(m) for name, m in models.items()}, repeats=args.repeats)
            rows.append({"stage": stage, "seq": seq, "dense_ms": times["dense"] * 1e3,
                         "compressed_ms": times["compressed"] * 1e3,
                         "speedup": times["dense"] / times["compressed"]})
    sizes = {name: model_bytes(p) for name, p in paths.items()}
    result: dict[str, Any] = {"rows": rows, "bytes": sizes, "repeats": args.repeats, "threads": args.threads,
                              "provider": models["dense"].session.get_providers()[0]}
    if kv:
        result["kv_bytes_per_token"] = {name: kv_bytes_per_token(m) for name, m in models.items()}
    text = dumps(result, "benchmark result")
    if args.json:
        print(text, end="")
        return 0
    print(f"{'stage':<8} {'seq':>6} {'dense ms':>10} {'compressed ms':>14} {'speedup':>8}")
    for r in rows:
        print(f"{r['stage']:<8} {r['seq']:>6} {r['dense_ms']:>10.2f} {r['compressed_ms']:>14.2f} "
              f"{r['speedup']:>7.2f}x")
    print(f"file size: dense {_mib(sizes['dense'])}, compressed {_mib(sizes['compressed'])}")
    if kv:
        kvb = result["kv_bytes_per_token"]
        print(f"KV cache per token: dense {kvb['dense']:,} B, compressed {kvb['compressed']:,} B")
    print(f"medians of {args.repeats} interleaved runs on {result['provider']}")
    return 0


def _context(metadata: dict[str, str]) -> int | None:
    """The context length an exported file records (files exported before it was recorded: None)."""
    from subfit_fx.onnx_format import CONTEXT_KEY

    value = metadata.get(CONTEXT_KEY, "")
    return int(value) if value.isdigit() else None


def _seq_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sequence lengths must be >= 1, got {text!r}")
    return values


PROVIDER_HELP = ("ONNX Runtime execution provider: auto (CUDA when this onnxruntime has it, else CPU), cpu, or cuda "
                 "(CUDAExecutionProvider, needs onnxruntime-gpu)")


def register(subparsers: argparse._SubParsersAction, commands: dict[str, Any] | None = None) -> None:
    """Add the `export`, `generate` and `bench` parsers, and their handlers to `commands`.

    `subfit_fx.cli` calls it for each module named in its `COMMAND_MODULES`.

    Example:
        >>> parser, commands = argparse.ArgumentParser(), {}
        >>> register(parser.add_subparsers(dest="command"), commands)
        >>> parser.parse_args(["export", "builtin:llama", "--out", "m.onnx", "--kv-cache"]).kv_cache, sorted(commands)
        (True, ['bench', 'export', 'generate'])
    """
    if commands is not None:
        commands.update(COMMANDS)
    p = subparsers.add_parser("export", help="export a dense or compressed model to ONNX")
    p.add_argument("model", help="a Hugging Face model directory, builtin:ARCH, or a compressed directory "
                                 "(written by 'subfit-fx compress')")
    p.add_argument("--out", required=True, help="output: a FILE.onnx, or a FOLDER that gets model.onnx, "
                   "config.json, generation_config.json and the tokenizer")
    p.add_argument("--kv-cache", action="store_true",
                   help="decoder with KV cache inputs/outputs (one graph for prefill and decode)")
    p.add_argument("--optimize", action="store_true", help="fuse attention, rotary and norms for ONNX Runtime")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 23: attention, rotary and RMS norm as standard ops; "
                        "older opsets decompose them, and --optimize fuses them back)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="quantize MatMul weights")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")

    p = subparsers.add_parser("generate", help="generate text with an exported KV-cache model")
    p.add_argument("onnx", help="ONNX file or folder written by 'subfit-fx export' (--kv-cache is faster)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded at export)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    p.add_argument("--top-k", type=positive_int, help="sample among the k most likely tokens")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto", help=PROVIDER_HELP)

    p = subparsers.add_parser("bench", help="time a dense and a compressed ONNX model against each other")
    p.add_argument("dense", help="the dense model's ONNX file")
    p.add_argument("compressed", help="the compressed model's ONNX file (same kind of export)")
    p.add_argument("--seq", type=_seq_list, default=[128], help="sequence / past lengths, e.g. 128,512")
    p.add_argument("--repeats", type=positive_int, default=10, help="interleaved timed runs per model (default 10)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto", help=PROVIDER_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


COMMANDS = {"export": cmd_export, "generate": cmd_generate, "bench": cmd_bench}
