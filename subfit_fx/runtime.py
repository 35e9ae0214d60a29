"""Run exported ONNX models with ONNX Runtime: plain logits and causal-LM generation with a KV cache.

Feeds are always built from the session's own inputs, because a rewrite can remove inputs (a graph
whose attention is all gone has no `attention_mask`, and a removed attention layer has no cache
tensors). The KV runner keeps the cache as `OrtValue`s bound with IO binding, so on the CUDA
provider it never leaves the device between steps.

Example:
    >>> lm = OnnxCausalLM("model.onnx")  # doctest: +SKIP
    >>> lm.generate([[5, 6, 7]], max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from subfit_fx.errors import InputError, ModelLoadError
from subfit_fx.onnx_format import (  # re-exported: readers of our files find the keys here too
    CACHE_LAYERS_KEY,
    KIND_KEY,
    KIND_KV_CACHE,
    KIND_PLAIN,
    PAST_PATTERN,
    SOURCE_KEY,
    TOKENIZER_KEY,
    VOCAB_KEY,
)

__all__ = [
    "KIND_KEY",
    "KIND_KV_CACHE",
    "KIND_PLAIN",
    "PROVIDERS",
    "SOURCE_KEY",
    "TOKENIZER_KEY",
    "VOCAB_KEY",
    "OnnxCausalLM",
    "OnnxRunner",
    "create_session",
    "default_providers",
    "model_metadata",
    "position_ids_from_mask",
    "providers_for",
]

_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def default_providers() -> list[str]:
    """ONNX Runtime execution providers to use: CUDA first when this build has it, then CPU.

    Example:
        >>> default_providers()[-1]
        'CPUExecutionProvider'
    """
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def providers_for(name: str = "auto") -> list[str]:
    """ONNX Runtime providers for a `--provider` value: auto (`default_providers`), cpu, or cuda
    (an `InputError` naming the fix when this ONNX Runtime build has no CUDA provider).

    Example:
        >>> providers_for("cpu")
        ['CPUExecutionProvider']
    """
    if name == "auto":
        return default_providers()
    if name not in PROVIDERS:
        raise InputError(f"unknown provider {name!r}; use auto, {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if PROVIDERS[name] not in available:
        raise InputError(f"this ONNX Runtime has no {PROVIDERS[name]} (it has {', '.join(available)}); install "
                         "onnxruntime-gpu (matching your CUDA) in place of onnxruntime, or pass --provider cpu")
    # the CPU provider stays as the fallback for the few ops a GPU provider leaves to it
    return [PROVIDERS[name], *(["CPUExecutionProvider"] if name != "cpu" else [])]


def create_session(path: str | Path, *, providers: Sequence[str] | None = None,
                   threads: int | None = None) -> ort.InferenceSession:
    """Open an ONNX file in ONNX Runtime (a clear error when it is missing or unreadable).

    `threads` caps intra-op threads (None: ONNX Runtime's default, one per core).

    Example:
        >>> session = create_session("model.onnx", threads=1)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"ONNX file '{path}' does not exist; export one with 'subfit-fx export'")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initializers etc. are noise to users
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(path), options, providers=list(providers or default_providers()))
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ModelLoadError(f"ONNX Runtime cannot load '{path}': {first}; re-export the model") from exc
    # ORT falls back to the CPU, with only a log line, when a GPU provider's libraries fail to load:
    # a run asked for on the GPU must not quietly time or serve the CPU
    if providers and providers[0] not in session.get_providers():
        raise ModelLoadError(f"ONNX Runtime could not start {providers[0]} for '{path}' (it would fall back to "
                             f"{session.get_providers()[0]}): the CUDA / cuDNN libraries onnxruntime-gpu needs are "
                             "missing or do not match it; install matching ones, or pass --provider cpu")
    return session


def model_metadata(session: ort.InferenceSession) -> dict[str, str]:
    """The custom metadata of a loaded model (subfit_fx writes its kind and source there).

    Example:
        >>> model_metadata(create_session("model.onnx"))["subfit_fx.kind"]  # doctest: +SKIP
        'kv-cache'
    """
    return dict(session.get_modelmeta().custom_metadata_map)


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions that skip left padding, as Hugging Face `generate` computes them.

    Example:
        >>> position_ids_from_mask(np.array([[0, 1, 1], [1, 1, 1]])).tolist()
        [[1, 0, 1], [0, 1, 2]]
    """
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)


def _as_ids(values: object) -> np.ndarray:
    array = np.asarray(values.cpu().numpy() if hasattr(values, "cpu") else values)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] == 0:
        raise InputError(f"input_ids must be shaped (batch, seq) with seq >= 1, got {array.shape}")
    return array.astype(np.int64)


class OnnxRunner:
    """Plain (no-cache) runner: one forward pass over whole sequences, returns the first output.

    Example:
        >>> runner = OnnxRunner("model.onnx")  # doctest: +SKIP
        >>> runner(np.array([[5, 6, 7]])).shape  # doctest: +SKIP
        (1, 3, 128)
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        self.session = create_session(path, providers=providers, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        if any(PAST_PATTERN.match(n) for n in self.input_names):
            raise InputError(f"'{path}' takes a KV cache; run it with OnnxCausalLM")

    def feeds(self, input_ids: object, attention_mask: object | None = None) -> dict[str, np.ndarray]:
        """The session's feeds for a batch (inputs the graph lacks are left out).

        Example:
            >>> sorted(OnnxRunner("model.onnx").feeds([[5, 6, 7]]))  # doctest: +SKIP
            ['attention_mask', 'input_ids']
        """
        ids = _as_ids(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else _as_ids(attention_mask)
        available = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids_from_mask(mask),
                     "token_type_ids": np.zeros_like(ids)}
        missing = [n for n in self.input_names if n not in available]
        if missing:
            raise InputError(f"the ONNX model needs inputs {missing} that OnnxRunner cannot build; "
                             "export it with subfit_fx.exporters.export_onnx")
        return {n: available[n] for n in self.input_names}

    def __call__(self, input_ids: object, attention_mask: object | None = None) -> np.ndarray:
        return self.session.run(self.output_names[:1], self.feeds(input_ids, attention_mask))[0]


class OnnxCausalLM:
    """Causal-LM runner for a KV-cache ONNX graph (prefill at past length 0, then decode steps).

    The cache lives in `OrtValue`s on the provider's device; logits come back to the host. A graph
    without cache inputs (every attention removed, or a plain export) still generates: with no
    attention left each step needs only its new token, and a plain graph re-runs the whole sequence.

    Example:
        >>> lm = OnnxCausalLM("model.onnx")  # doctest: +SKIP
        >>> lm.generate([[5, 6, 7]], 4, do_sample=True, top_k=20, seed=0)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path, *, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = create_session(path, providers=providers, threads=threads)
        self.metadata = model_metadata(self.session)
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.logits_name = "logits" if "logits" in self.output_names else self.output_names[0]
        # past input name -> (present output name, (heads, head_dim), numpy dtype)
        self.cache: dict[str, tuple[str, tuple[int, int], type]] = {}
        for i in inputs:
            match = PAST_PATTERN.match(i.name)
            if not match:
                continue
            present = f"present.{match[1]}.{match[2]}"
            if present not in self.output_names:
                raise InputError(f"'{path}' has cache input {i.name} but no output {present}")
            heads, head_dim = i.shape[1], i.shape[3]
            if not (isinstance(heads, int) and isinstance(head_dim, int)):
                raise InputError(f"cache input {i.name} of '{path}' has symbolic heads/head_dim {i.shape}")
            self.cache[i.name] = (present, (heads, head_dim), _ORT_DTYPES.get(i.type, np.float32))
        known = {"input_ids", "attention_mask", "position_ids", *self.cache}
        unknown = [n for n in self.input_names if n not in known]
        if unknown:
            raise InputError(f"'{path}' needs inputs {unknown} that OnnxCausalLM cannot build")
        kind = self.metadata.get(KIND_KEY)
        # Without metadata: a graph with cache inputs is a cache graph, one without is treated as plain
        self.has_cache_graph = kind == KIND_KV_CACHE or (kind is None and bool(self.cache))
        providers = self.session.get_providers()
        self.device = "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"
        named = sorted({int(PAST_PATTERN.match(n)[1]) for n in self.cache})
        # an ONNX folder numbers its caches 0..K-1 (onnxruntime-genai's convention); the metadata
        # keeps the real layer indices
        recorded = [int(x) for x in self.metadata.get(CACHE_LAYERS_KEY, "").split(",") if x.strip().isdigit()]
        self.layers_with_cache = recorded if len(recorded) == len(named) else named

    def empty_cache(self, batch: int) -> dict[str, ort.OrtValue]:
        """A past-length-0 cache for `batch` sequences (what prefill takes).

        Example:
            >>> OnnxCausalLM("model.onnx").empty_cache(2)["past_key_values.0.key"].shape()  # doctest: +SKIP
            [2, 2, 0, 16]
        """
        return {name: ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, h, 0, d), dtype), self.device, 0)
                for name, (_, (h, d), dtype) in self.cache.items()}

    def forward(self, input_ids: object, attention_mask: object,
                cache: dict[str, ort.OrtValue] | None = None,
                position_ids: object | None = None) -> tuple[np.ndarray, dict[str, ort.OrtValue]]:
        """One step: logits (batch, new tokens, vocab) and the grown cache.

        `attention_mask` spans past and new tokens; `cache` defaults to an empty one (prefill).

        Example:
            >>> lm = OnnxCausalLM("model.onnx")  # doctest: +SKIP
            >>> logits, cache = lm.forward([[5, 6, 7]], [[1, 1, 1]])  # doctest: +SKIP
            >>> logits, cache = lm.forward([[8]], [[1, 1, 1, 1]], cache)  # doctest: +SKIP
        """
        ids = _as_ids(input_ids)
        mask = _as_ids(attention_mask)
        if position_ids is None:
            position_ids = position_ids_from_mask(mask)[:, -ids.shape[1]:]
        cache = self.empty_cache(ids.shape[0]) if cache is None else cache
        binding = self.session.io_binding()
        host = {"input_ids": ids, "attention_mask": mask, "position_ids": _as_ids(position_ids)}
        for name in self.input_names:
            if name in self.cache:
                binding.bind_ortvalue_input(name, cache[name])
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(host[name]))
        for name in self.output_names:
            # logits go to the host; the cache stays where the provider computed it
            binding.bind_output(name, "cpu" if name == self.logits_name else self.device)
        self.session.run_with_iobinding(binding)
        values = dict(zip(self.output_names, binding.get_outputs()))
        new_cache = {past: values[present] for past, (present, _, _) in self.cache.items()}
        return values[self.logits_name].numpy(), new_cache

    def generate(self, input_ids: object, max_new_tokens: int = 32, *, attention_mask: object | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None, eos_token_id: int | None = None) -> np.ndarray:
        """Greedy (default) or sampled continuation; returns prompt + new tokens, (batch, seq + new).

        Sequences that emit `eos_token_id` are padded with it until all have finished.

        Example:
            >>> lm = OnnxCausalLM("model.onnx")  # doctest: +SKIP
            >>> lm.generate([[5, 6, 7]], max_new_tokens=2).shape  # doctest: +SKIP
            (1, 5)
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_k is not None and top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        ids = _as_ids(input_ids)
        mask = np.ones_like(ids) if attention_mask is None else _as_ids(attention_mask)
        rng = np.random.default_rng(seed)
        done = np.zeros(ids.shape[0], dtype=bool)
        cache = None
        step_ids = ids
        for _ in range(max_new_tokens):
            if self.has_cache_graph:
                logits, cache = self.forward(step_ids, mask, cache)
            else:
                logits, _ = self.forward(ids, mask)
            token = _pick(logits[:, -1, :].astype(np.float64), do_sample, temperature, top_k, rng)
            if eos_token_id is not None:
                token = np.where(done, eos_token_id, token)
                done |= token == eos_token_id
            ids = np.concatenate([ids, token[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(token)[:, None]], axis=1)
            step_ids = token[:, None]
            if eos_token_id is not None and done.all():
                break
        return ids


def _pick(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None,
          rng: np.random.Generator) -> np.ndarray:
    if not do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], dtype=np.int64)
