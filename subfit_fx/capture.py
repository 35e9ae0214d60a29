"""Get a model into a graph: loading from a directory and `torch.export` capture.

Hugging Face models are wrapped so that the captured program has the signature
`(input_ids, attention_mask) -> logits` (causal LMs) or `-> last_hidden_state` (encoders):
one tensor in, one tensor out, the same for every architecture. Labels strip the wrapper's
attribute name, so they equal the model's own module paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as tf

from subfit_fx.errors import CaptureError, InputError, ModelLoadError

__all__ = ["WRAPPED_PREFIX", "HFWrapper", "capture", "check_remote_code", "check_weight_files", "example_inputs",
           "is_causal_lm", "load_model"]

WRAPPED_PREFIX = "hf."


class HFWrapper(torch.nn.Module):
    """`(input_ids, attention_mask) -> tensor` view of a Hugging Face model.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> w = HFWrapper(tiny_model("llama"))
        >>> w(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)).shape
        torch.Size([2, 4, 128])
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.hf = model
        self.causal = is_causal_lm(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.causal:
            return self.hf(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def is_causal_lm(model: torch.nn.Module) -> bool:
    """True for a Hugging Face causal LM (has an LM head and generates), False for encoders.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> is_causal_lm(tiny_model("gpt2")), is_causal_lm(tiny_model("bert"))
        (True, False)
    """
    if isinstance(model, HFWrapper):
        return model.causal
    return isinstance(model, tf.PreTrainedModel) and model.can_generate()


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, *,
               trust_remote_code: bool = False) -> torch.nn.Module:
    """Load a local Hugging Face model directory (or a .gguf file, see `subfit_fx.gguf`) in eval
    mode, from safetensors only, in `dtype` (None or "auto": the checkpoint's own, from its config).

    Causal LMs load with their LM head, other models (BERT family) as encoders. A model whose
    config names its own Python code (`auto_map`) loads only with `trust_remote_code=True`.

    Example:
        >>> model = load_model("runs/reference")  # doctest: +SKIP
    """
    from subfit_fx.gguf import gguf_directory, is_gguf

    path = gguf_directory(path) if is_gguf(path) else Path(path)
    if not path.exists():
        raise ModelLoadError(f"model path '{path}' does not exist; pass a local Hugging Face model "
                             "directory (one holding config.json and *.safetensors) or a .gguf file")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ModelLoadError(f"'{path}' is not a model directory (no config.json); pass the folder "
                             "written by save_pretrained()")
    check_remote_code(path, trust_remote_code)
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelLoadError(f"cannot read '{path / 'config.json'}': {_first_line(exc)}; "
                             "fix or regenerate the config") from exc
    check_weight_files(path)
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
    from subfit_fx.devices import resolve_dtype

    try:
        # mismatched shapes are reported by us below, by name, instead of transformers' "see the report"
        model, info = cls.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                          ignore_mismatched_sizes=True, output_loading_info=True,
                                          dtype=resolve_dtype(dtype) or "auto", trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(f"cannot load weights from '{path}': {_first_line(exc)}; the "
                             "safetensors files may be corrupt: re-save or re-download them") from exc
    _check_loading_info(path, config, info,
                        own_modules=None if causal else {n for n, _ in model.named_children()})
    return model.eval()


def check_remote_code(path: Path, trust_remote_code: bool) -> None:
    """Refuse, before transformers runs anything, a model that needs its own code without the flag
    (transformers would ask on a terminal, or fail with a paragraph).

    Example:
        >>> check_remote_code(Path("runs/reference"), trust_remote_code=False)  # doctest: +SKIP
    """
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # AutoConfig reports a bad config next, with its own message
    if trust_remote_code or not isinstance(data, dict) or not data.get("auto_map"):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if data.get("model_type") not in CONFIG_MAPPING:
        raise ModelLoadError(f"'{path}' needs its own Python code to load (auto_map in config.json, model_type "
                             f"{data.get('model_type')!r} unknown to transformers); pass --trust-remote-code "
                             "(trust_remote_code=True) if you trust that code: it runs on this machine")


def check_weight_files(path: Path) -> list[Path]:
    """The safetensors files of model directory `path`, resolved before transformers reads it: an
    index must name only `*.safetensors` files inside the directory, so nothing is ever unpickled.

    Example:
        >>> check_weight_files(Path("."))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.ModelLoadError: '.' has no *.safetensors weights; ...
    """
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"'{index}' is not a safetensors index (no weight_map of file names: "
                                 f"{_first_line(exc)}); re-save the model with save_pretrained()") from exc
        for name in sorted(names, key=str):
            # by name, not resolved path: hub caches link weights to blobs elsewhere
            if not (isinstance(name, str) and name.endswith(".safetensors") and Path(name).name == name):
                raise ModelLoadError(f"'{index}' maps weights to {name!r}, not a *.safetensors file in "
                                     "the model directory; subfit_fx never unpickles weights: re-save the "
                                     "model with save_pretrained(safe_serialization=True)")
            if not (path / name).is_file():
                raise ModelLoadError(f"'{index}' names '{name}', which is missing from '{path}'; "
                                     "re-download or re-save the model")
        return [path / name for name in sorted(names)]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if any(path.glob("*.safetensors")):
        raise ModelLoadError(f"'{path}' has *.safetensors files but neither model.safetensors nor "
                             "model.safetensors.index.json; re-save the model with save_pretrained()")
    raise ModelLoadError(f"'{path}' has no *.safetensors weights; subfit_fx never unpickles "
                         "weights: re-save the model with save_pretrained(safe_serialization=True)")


def _check_loading_info(path: Path, config: object, info: dict, own_modules: set[str] | None) -> None:
    """Every architecture parameter came from the checkpoint and every checkpoint tensor was used
    (transformers leaves tied weights out of both lists); otherwise the model would silently run
    with random weights."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    if own_modules is not None:
        # an encoder loaded from a checkpoint with a task head (BertForMaskedLM): tensors outside
        # the encoder's own modules are the head's, and the pooler is unused (capture prunes it)
        missing = [k for k in missing if not k.startswith("pooler.")]
        unexpected = [k for k in unexpected if k.split(".")[0] in own_modules]
    problems = []
    if info.get("mismatched_keys"):
        shapes = sorted(info["mismatched_keys"])
        problems.append(f"{len(shapes)} tensors have the wrong shape (e.g. " + ", ".join(
            f"{k} {list(a)} vs config {list(b)}" for k, a, b in shapes[:2]) + ")")
    if missing:
        problems.append(f"{len(missing)} parameters are missing from the weights (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors in the weights are unused (e.g. {', '.join(unexpected[:3])})")
    if problems:
        kind = getattr(config, "model_type", "?")
        raise ModelLoadError(f"weights in '{path}' do not match its config.json (model_type {kind}): "
                             f"{'; '.join(problems)}; the config and the weights come from different "
                             "models: restore the config.json saved with these weights")


def example_inputs(model: torch.nn.Module, batch: int = 2, seq: int = 8) -> tuple[torch.Tensor, ...]:
    """Token ids and an all-ones attention mask shaped (batch, seq) for a Hugging Face model, on
    the model's device.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> ids, mask = example_inputs(tiny_model("llama"))
        >>> tuple(ids.shape)
        (2, 8)
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "vocab_size", None) is None:
        raise InputError(f"cannot make example inputs for {type(model).__name__}: it has no "
                         "Hugging Face config; pass example_inputs=(...) to capture()")
    max_pos = max_positions(model) or seq
    seq = max(2, min(seq, max_pos))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (max(2, batch), seq), generator=gen)
    # where the weights are: torch.export runs the model on them (a GPU model on CPU ids fails)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = ids.to(device)
    return ids, torch.ones_like(ids)


def max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model accepts, from its config (None when unbounded or unknown).

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> max_positions(tiny_model("gpt2"))
        128
    """
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def capture(model: torch.nn.Module, example_inputs: tuple | None = None) -> torch.export.ExportedProgram:
    """Capture `model` with non-strict `torch.export`, batch and sequence dimensions dynamic.

    A Hugging Face model is wrapped in `HFWrapper` first; for other modules pass
    `example_inputs` (every tensor of rank >= 2 gets dynamic dims 0 and 1; use batch >= 2 and
    seq >= 2 or export specializes them to 1).

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> ep = capture(tiny_model("llama"))
        >>> [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        ['input_ids', 'attention_mask']
    """
    module = model
    if isinstance(model, tf.PreTrainedModel):
        module = HFWrapper(model)
    if isinstance(module, HFWrapper):
        inputs = example_inputs if example_inputs is not None else globals()["example_inputs"](module.hf)
        limit = max_positions(module.hf)
    else:
        if example_inputs is None:
            raise InputError(f"capture() needs example_inputs for {type(model).__name__} (not a "
                             "Hugging Face model): pass a tuple of tensors matching its forward()")
        inputs, limit = tuple(example_inputs), None
    module.eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=limit) if limit else torch.export.Dim("seq", min=2)
    dynamic = tuple({0: batch, 1: seq} if isinstance(t, torch.Tensor) and t.dim() >= 2 else None
                    for t in inputs)
    try:
        with torch.no_grad():
            try:
                ep = torch.export.export(module, tuple(inputs), dynamic_shapes=dynamic, strict=False)
            except torch._dynamo.exc.UserError as exc:
                if "Constraints violated" not in str(exc):
                    raise
                # torch 2.11 on CUDA emits guards (from the attention kernels' shape rules) that its
                # solver cannot prove for named ranges; Dim.DYNAMIC lets export keep them as checks
                auto = tuple({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC} if d else None
                             for d in dynamic)
                ep = torch.export.export(module, tuple(inputs), dynamic_shapes=auto, strict=False)
    except Exception as exc:
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: "
                           f"{_first_line(exc)}; pass example_inputs matching forward() or remove "
                           "data-dependent Python control flow from the model") from exc
    # Unused outputs of the model (BERT's pooler, for example) are dead weight in every later step.
    from subfit_fx.graph_cleanup import clean_program

    return clean_program(ep)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


