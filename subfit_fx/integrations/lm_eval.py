"""lm-evaluation-harness on subfit_fx models: the lm-eval model `subfit` (`pip install subfit-fx[eval]`).

`SubfitLM` is an lm-eval `TemplateLM` over any `(input_ids, attention_mask) -> logits` module:
a compressed directory (`subfit_fx.load(DIR).module()`), a Hugging Face causal-LM directory or
`builtin:ARCH` (captured dense). It implements `loglikelihood` (multiple-choice tasks),
`loglikelihood_rolling` (perplexity tasks) and `generate_until` (greedy decoding, one token per
full forward: the captured program has no KV cache, so generation tasks are slow on long outputs).

`evaluate_tasks` runs tasks on a compressed directory and on its dense base and reports
retention = compressed / dense per metric (dense / compressed where lower is better, e.g.
perplexity, so below 1 always means worse); `subfit-fx eval DIR --tasks t1,t2` is its command line.

How lm-eval finds the model. lm-eval 0.4.13 knows the models of its own table
(`lm_eval.models.MODEL_MAPPING`) and whatever the running process has added to
`lm_eval.api.registry.model_registry` (what `@register_model` does). It reads no entry points, and
`--include_path` loads task YAML only; importing model code by a flag is an open request upstream
(EleutherAI/lm-evaluation-harness issues #1457, #1621, #3282 and pull request #3672). So the plain
`lm_eval --model subfit` cannot see this package; importing this module registers `subfit`, and
running it forwards every argument to lm-eval's own command line after registering:

    python -m subfit_fx.integrations.lm_eval_cli --model subfit --model_args path=DIR --tasks hellaswag

In Python, `import subfit_fx.integrations.lm_eval` before `lm_eval.simple_evaluate(model="subfit",
model_args="path=DIR")`, or pass `model=SubfitLM(path=DIR)`.

model_args: `path` (required: compressed DIR, model directory or builtin:ARCH), `dense` (true: the
dense base of a compressed DIR), `max_length` (default the model's context, at most 2048),
`max_gen_toks` (default 256). lm-eval's own `--batch_size` (an integer; `auto` means 8 here) and
`--device` (default cpu) reach the model too; as for every lm-eval model, they cannot also be model_args.

Example:
    >>> lm = SubfitLM(path="builtin:llama", max_length=64)
    >>> lm.max_length, lm.eot_token_id
    (64, 1)
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import TemplateLM
except ImportError as _exc:
    raise ImportError("subfit_fx.integrations.lm_eval needs lm-evaluation-harness, which cannot be imported "
                      f"({_exc}); install it with: pip install 'subfit-fx[eval]'", name="lm_eval") from _exc

from subfit_fx.data import ByteTokenizer
from subfit_fx.errors import InputError

__all__ = ["DEFAULT_MAX_LENGTH", "MODEL_NAME", "SubfitLM", "evaluate_tasks", "register"]

MODEL_NAME = "subfit"
# lm-eval scores with the model's whole context; long-context models are capped so that CPU
# evaluation stays feasible (model_args max_length=N overrides it).
DEFAULT_MAX_LENGTH = 2048
# model_args lm-eval itself may add; they mean nothing for a captured program.
_IGNORED_ARGS = ("max_batch_size", "trust_remote_code")

Module = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def register() -> None:
    """Register `SubfitLM` as lm-eval's model `subfit` (done on import; idempotent).

    The registry gets the import path, not the class, so the module run as `python -m` and the
    module imported by that name register one model, not two that collide.

    Example:
        >>> from lm_eval.api.registry import get_model
        >>> register(); get_model("subfit").__name__
        'SubfitLM'
    """
    # lm-eval fills its registry with its own models only when the registry is empty on first
    # lookup: fill it first, or registering ours would hide `hf` and the rest.
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target="subfit_fx.integrations.lm_eval:SubfitLM")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise InputError(f"model_args {name}={value} is not a boolean; use {name}=true or {name}=false")


def _positive_int(value: Any, name: str, default: int) -> int:
    if value is None or str(value).startswith("auto"):  # lm-eval's batch_size=auto: no probing here
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise InputError(f"model_args {name}={value} must be a positive integer, e.g. {name}={default}")
    return number


def open_model(spec: str | Path, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None) -> tuple[Any, torch.nn.Module, Any]:
    """(Compressed or None, the Hugging Face model (for a compressed directory: its base architecture,
    see `Compressed.dense_model` for the dense one), its tokenizer) for MODEL_OR_DIR.

    A compressed directory (one holding recipe.json) loads with `subfit_fx.load`; its tokenizer is
    the one saved in the directory, else the base model's. Encoders are refused: lm-eval scores text.

    Example:
        >>> compressed, base, tokenizer = open_model("builtin:gpt2")
        >>> compressed is None, type(tokenizer).__name__
        (True, 'ByteTokenizer')
    """
    from subfit_fx.capture import is_causal_lm
    from subfit_fx.compress import load
    from subfit_fx.data import load_tokenizer
    from subfit_fx.models import resolve_model

    path = Path(spec)
    if path.is_dir() and (path / "recipe.json").is_file():
        compressed = load(path, dtype=dtype, device=device)
        base = compressed.base_model
        source = str(path) if any(path.glob("tokenizer*")) else compressed.recipe.base_model
    else:
        compressed, base, source = None, resolve_model(str(spec), dtype=dtype, device=device), str(spec)
    if not is_causal_lm(base):
        raise InputError(f"'{spec}' is an encoder ({type(base).__name__}); lm-eval tasks score text with a causal "
                         "LM: evaluate encoders with subfit-fx eval MODEL --text FILE")
    return compressed, base, load_tokenizer(base, source)


def _dense_of(compressed: Any) -> torch.nn.Module:
    dense = compressed.dense_model()
    if dense is None:
        raise InputError(f"{compressed.dense_gone()}; evaluate the base model directory itself instead")
    return dense


class SubfitLM(TemplateLM):
    """lm-eval model over a subfit_fx module `(input_ids, attention_mask) -> logits`.

    Either `path` (what `--model_args path=DIR` gives) or an already loaded `module` with its
    `tokenizer` and the model `config` (how `evaluate_tasks` runs compressed and dense models
    that share one load).

    Example:
        >>> lm = SubfitLM(path="builtin:llama")
        >>> lm.tok_decode(lm.tok_encode("hi"))
        'hi'
    """

    def __init__(self, path: str | None = None, dense: bool | str = False, batch_size: int | str | None = 8,
                 max_length: int | str | None = None, max_gen_toks: int | str = 256, device: str | None = None,
                 *, module: Module | None = None, tokenizer: Any = None, config: Any = None,
                 progress: bool = True, **unknown: Any) -> None:
        super().__init__()
        unknown = {k: v for k, v in unknown.items() if k not in _IGNORED_ARGS}
        if unknown:
            raise InputError(f"unknown model_args {', '.join(sorted(unknown))}; the subfit model takes path, dense, "
                             "batch_size, max_length, max_gen_toks and device")
        want_dense = _as_bool(dense, "dense")
        if module is None:
            if not path:
                raise InputError("the subfit model needs a model: --model_args path=DIR (a compressed directory, a "
                                 "Hugging Face model directory or builtin:ARCH)")
            from subfit_fx.capture import capture

            compressed, base, tokenizer = open_model(path)
            if compressed is not None and want_dense:
                base = _dense_of(compressed)
            module = compressed.module() if compressed is not None and not want_dense else capture(base).module()
            config = base.config
        elif tokenizer is None or config is None:
            raise InputError("SubfitLM(module=...) needs the tokenizer= and config= of its model too")
        self.module, self.tokenizer, self.config, self.progress = module, tokenizer, config, progress
        self._device = _usable_device(device)
        if self._device.type != "cpu":
            self.module.to(self._device)
        self.batch_size = _positive_int(batch_size, "batch_size", 8)
        limit = _config_positions(config)
        self._max_length = _positive_int(max_length, "max_length", min(limit or DEFAULT_MAX_LENGTH,
                                                                       DEFAULT_MAX_LENGTH))
        if limit is not None and self._max_length > limit:
            raise InputError(f"max_length {self._max_length} exceeds the model's {limit} positions; use {limit} or "
                             "less (model_args max_length=N, or subfit-fx eval --seq-len N)")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks", 256)
        eos = getattr(tokenizer, "eos_token_id", None)
        eos = getattr(config, "eos_token_id", None) if eos is None else eos
        eos = eos[0] if isinstance(eos, list | tuple) else eos
        if eos is None:
            raise InputError("the model has no end-of-text token (neither its tokenizer nor its config sets "
                             "eos_token_id); set eos_token_id in config.json")
        self._eot = int(eos)
        bos = getattr(tokenizer, "bos_token_id", None)
        bos = getattr(config, "bos_token_id", None) if bos is None else bos
        self._prefix = int(bos[0] if isinstance(bos, list | tuple) else bos) if bos is not None else self._eot

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        # an empty context is scored after BOS (else EOS), as lm-eval's `hf` model does
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "byte-tokenizer")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of `string`; special tokens as the tokenizer adds them by default, as lm-eval's
        `hf` model does (none when the string already starts with BOS)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            ids = self.tokenizer(string)["input_ids"]
        else:
            options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            bos = getattr(self.tokenizer, "bos_token", None)
            if add_special_tokens is None and bos and string.startswith(bos):
                options["add_special_tokens"] = False
            ids = self.tokenizer.encode(string, **options)
        return list(ids[-left_truncate_len:] if left_truncate_len else ids)

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer.decode(tokens)
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InputError("--apply_chat_template needs a tokenizer with a chat template, and this model's has "
                             "none; evaluate without it")
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.chat_template(True)
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records about the model in its results (`config`)."""
        return {"model_num_parameters": sum(p.numel() for p in self.module.parameters()),
                "max_length": self.max_length}

    # -- scoring ------------------------------------------------------------------------------

    def _logits(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits (batch, longest row, vocab) of right-padded rows: a causal model's logits at a real
        position never see the padding after it. Rows are padded to 2 tokens at least, the shortest
        sequence a captured program accepts."""
        width = max(2, *(len(r) for r in rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(list(row), dtype=torch.long)
            mask[i, : len(row)] = 1
        with torch.no_grad():
            return self.module(ids.to(self._device), mask.to(self._device)).float()

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        # longest first: batches of similar length waste little padding
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        size = override_bs or self.batch_size
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        for start in tqdm(range(0, len(order), size), desc="subfit loglikelihood", unit="batch",
                          disable=disable_tqdm or not self.progress):
            batch = order[start: start + size]
            rows = []
            for i in batch:
                _, context, continuation = requests[i]
                if len(continuation) > self.max_length:
                    raise InputError(f"a continuation of {len(continuation)} tokens exceeds max_length "
                                     f"{self.max_length}; raise model_args max_length or shorten the task's choices")
                rows.append((context + continuation)[-(self.max_length + 1):][:-1])
            logits = self._logits(rows)
            for k, i in enumerate(batch):
                key, _, continuation = requests[i]
                n, m = len(rows[k]), len(continuation)
                if m == 0:
                    answer = (0.0, True)
                else:
                    logprobs = torch.log_softmax(logits[k, n - m: n], dim=-1)
                    target = torch.as_tensor(continuation, device=logprobs.device)
                    answer = (float(logprobs.gather(-1, target[:, None]).sum()),
                              bool((logprobs.argmax(-1) == target).all()))
                results[i] = answer
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in windows of `max_length` (lm-eval's rolling scheme:
        every token predicted once, with as much context as fits)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in tqdm(requests, desc="subfit rolling loglikelihood", disable=disable_tqdm or not self.progress):
            (string,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, EOS or `max_gen_toks`
        (sampling options are ignored: decoding is always greedy)."""
        from lm_eval.models.utils import normalize_gen_kwargs

        out = []
        for request in tqdm(requests, desc="subfit generate", disable=disable_tqdm or not self.progress):
            context, gen_kwargs = request.args
            options = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            stops = [s for s in options["until"] if s]
            ids = self.tok_encode(context) or [self.prefix_token_id]
            new: list[int] = []
            text = ""
            for _ in range(options["max_gen_toks"]):
                window = (ids + new)[-self.max_length:]
                token = int(self._logits([window])[0, len(window) - 1].argmax())
                if token == self.eot_token_id:
                    break
                new.append(token)
                text = self.tok_decode(new)
                if any(s in text for s in stops):
                    break
            for stop in stops:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            out.append(text)
        return out


def _usable_device(device: str | None) -> torch.device:
    """`device`, or the CPU when it is not there: lm-eval's command line asks for cuda:0 by default,
    and its `hf` model falls back the same way."""
    if not device:
        return torch.device("cpu")
    try:
        wanted = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"--device {device} is not a torch device; use cpu, cuda or cuda:N") from exc
    if wanted.type == "cuda" and (not torch.cuda.is_available() or (wanted.index or 0) >= torch.cuda.device_count()):
        print(f"subfit lm-eval model: device {device} is not available; running on cpu", file=sys.stderr)
        return torch.device("cpu")
    return wanted


def _config_positions(config: Any) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _task_manager(tasks: Sequence[str], include_path: Sequence[str | Path] | None) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [Path(p) for p in include_path or ()]
    for p in paths:
        if not p.is_dir():
            raise InputError(f"--include-path '{p}' is not a directory; pass the folder holding your task YAML files")
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False) if paths else None
    # Indexing lm-eval's ~15,000 built-in task files takes seconds: skip it when the tasks are all local
    # (and a local group that names built-in tasks fails to load without them: try again with them).
    if local is not None and all(name in local.all_tasks for name in tasks):
        try:
            local.load(list(tasks))
            return local
        except Exception:  # the same error, if it is one, comes back from the full index below
            pass
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known and not Path(name).is_file():
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise InputError(f"lm-eval has no task '{name}'{hint}; list them with `lm-eval ls tasks`, and pass "
                             "--include-path DIR for task YAML files of your own")
    try:
        manager.load(list(tasks))
    except Exception as exc:  # a task's dataset: offline hub, bad data_files, a YAML error, ...
        raise InputError(f"lm-eval could not load {', '.join(tasks)}: {_first_line(exc)}; tasks fetch their data "
                         "from the Hugging Face Hub unless their YAML names local files: run once with network "
                         "access or use --include-path with a local task") from exc
    return manager


def _retention(compressed: Any, dense: Any, higher_is_better: bool) -> float | None:
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in (compressed, dense)):
        return None
    num, den = (compressed, dense) if higher_is_better else (dense, compressed)
    return num / den if den else None


def _summary(raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task and metric: each run's value and stderr, and retention when both runs are there."""
    reference = raw.get("compressed") or raw["dense"]
    tasks: dict[str, Any] = {}
    for task, metrics in reference["results"].items():
        # the metrics are what the task declares a direction for; "sample_len", "alias" are bookkeeping
        higher = reference.get("higher_is_better", {}).get(task, {})
        rows: dict[str, dict[str, Any]] = {}
        for key, value in metrics.items():
            name, _, flt = key.partition(",")
            if name not in higher or not isinstance(value, int | float):
                continue
            row: dict[str, Any] = {}
            for run, result in raw.items():
                values = result["results"].get(task, {})
                row[run] = values.get(key)
                stderr = values.get(f"{name}_stderr,{flt}" if flt else f"{name}_stderr")
                if isinstance(stderr, int | float):
                    row[f"{run}_stderr"] = stderr
            if len(raw) == 2:
                row["retention"] = _retention(row["compressed"], row["dense"], bool(higher[name]))
            rows[name if flt in ("", "none") else key] = row
        samples = reference.get("n-samples", {}).get(task, {})
        tasks[task] = {"metrics": rows, "primary": next(iter(rows), None), "samples": samples.get("effective")}
    return tasks


def evaluate_tasks(model: str | Path, tasks: Sequence[str], *, limit: int | None = None,
                   num_fewshot: int | None = None, include_path: Sequence[str | Path] | None = None,
                   dense: bool = True, batch_size: int = 8, max_length: int | None = None,
                   progress: bool = True, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None) -> dict[str, Any]:
    """Run lm-eval `tasks` on MODEL_OR_DIR; a compressed directory runs with its dense base too
    (unless `dense=False`) and gets retention per metric.

    Returns a JSON-ready dict: `score` (task -> the primary metric of the evaluated model, the
    compressed one when there is one), `retention` (task -> primary retention), and `results`
    (task -> every metric's values, stderrs and retention).

    Example:
        >>> r = evaluate_tasks("out/llama-25", ["arc_easy"], limit=100)  # doctest: +SKIP
        >>> r["score"]["arc_easy"], r["retention"]["arc_easy"]  # doctest: +SKIP
        (0.52, 0.93)
    """
    import lm_eval

    from subfit_fx.capture import capture

    names = [t for t in tasks if t]
    if not names:
        raise InputError("no lm-eval task given; pass --tasks NAME[,NAME...], e.g. --tasks arc_easy,hellaswag")
    compressed, base, tokenizer = open_model(model, dtype=dtype, device=device)
    manager = _task_manager(names, include_path)
    where = next(base.parameters()).device  # the models are captured there; the runs feed it inputs
    common = {"tokenizer": tokenizer, "config": base.config, "batch_size": batch_size, "max_length": max_length,
              "progress": progress, "device": str(where)}
    runs = {}
    if compressed is not None:
        runs["compressed"] = SubfitLM(module=compressed.module(), **common)
    dense_model = base if compressed is None else compressed.dense_model() if dense else None
    if dense and compressed is not None and dense_model is None:
        print(f"note: {compressed.dense_gone()}; evaluating the compressed model alone", file=sys.stderr)
    if dense_model is not None:
        runs["dense"] = SubfitLM(module=capture(dense_model).module(), **common)
    raw = {}
    for run, lm in runs.items():
        if progress:
            print(f"lm-eval: {', '.join(names)} on the {run} model", file=sys.stderr)
        raw[run] = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                           num_fewshot=num_fewshot, log_samples=False, batch_size=lm.batch_size)
    results = _summary(raw)
    main_run = "compressed" if compressed is not None else "dense"
    kind = f"compressed ({compressed.recipe.method})" if compressed is not None else "dense"
    return {
        "model": str(model), "model_kind": kind, "tasks": names, "limit": limit, "num_fewshot": num_fewshot,
        "lm_eval_version": lm_eval.__version__, "max_length": runs[main_run].max_length,
        "score": {t: r["metrics"][r["primary"]][main_run] for t, r in results.items() if r["primary"]},
        **({"retention": {t: r["metrics"][r["primary"]]["retention"] for t, r in results.items() if r["primary"]}}
           if len(runs) == 2 else {}),
        "results": results,
    }


register()
