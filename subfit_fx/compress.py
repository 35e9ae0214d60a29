"""The one-call API: `compress(model, calib, sparsity)` -> `Compressed`, and `load(dir)`.

Example:
    >>> from subfit_fx.zoo import tiny_model
    >>> calib = torch.randint(0, 128, (8, 16))
    >>> c = compress(tiny_model("llama", layers=4), calib, sparsity=0.25, progress=False)
    >>> abs(c.report.sparsity_actual - 0.25) < 0.2
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from subfit_fx.atomic import atomic_dir
from subfit_fx.branches import count_block_params, count_params, find_branches
from subfit_fx.calibrate import Session, prepare
from subfit_fx.capture import capture, is_causal_lm, max_positions
from subfit_fx.data import Batch, load_tokenizer, split_batches, text_batches, token_batches
from subfit_fx.devices import dtype_name, model_dtype, module_device, to_device
from subfit_fx.errors import InputError, ModelLoadError
from subfit_fx.gguf import gguf_directory, is_gguf
from subfit_fx.heal import HEAL_LR, check_heal, heal_recipe
from subfit_fx.html_report import write_html_report
from subfit_fx.methods import DEFAULT_METHOD, PolicyContext, check_method, check_offloadable, method_options
from subfit_fx.models import local_spec, resolve_model
from subfit_fx.recipe import Recipe
from subfit_fx.report import Report, build_report
from subfit_fx.rewrite import apply_recipe
from subfit_fx.schema import check_report, dumps, read_json
from subfit_fx.selection import BUDGET_TOLERANCE, check_sparsity
from subfit_fx.standalone import is_standalone, load_base_skeleton, weights_sha256, write_standalone

__all__ = ["CalibrationConfig", "Compressed", "calibration_batches", "compress", "load"]


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is drawn and used, checked when built: `samples` sequences of `seq_len`
    tokens (from a text file), `batch_size` per forward, `seed` for sampling and fits, `skip_first`
    (statistics ignore each sequence's first token, an attention sink), `holdout` (fraction of
    sequences kept for held-out scoring).

    Example:
        >>> CalibrationConfig(samples=32).seq_len
        256
        >>> CalibrationConfig(samples=0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: samples=0 must be a positive integer...
    """

    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    skip_first: bool = False
    holdout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r} must be a positive integer; pass e.g. {name}=8")
        if not 0 <= self.holdout < 1:
            raise InputError(f"holdout={self.holdout} must be a fraction in [0, 1); pass e.g. holdout=0.25")

    @classmethod
    def take(cls, kwargs: dict[str, Any], base: CalibrationConfig | None = None) -> CalibrationConfig:
        """Pop this class's fields from a function's `kwargs` into a config on top of `base`.

        Example:
            >>> kwargs = {"samples": 8, "rounds": 2}
            >>> CalibrationConfig.take(kwargs).samples, kwargs
            (8, {'rounds': 2})
        """
        given = {name: kwargs.pop(name) for name in list(kwargs) if name in cls.__dataclass_fields__}
        return dataclasses.replace(base or cls(), **given)

    def recorded(self) -> dict[str, Any]:
        """The settings a recipe records (batch size changes memory, not the result, so it is left out).

        Example:
            >>> sorted(CalibrationConfig().recorded())
            ['holdout', 'samples', 'seed', 'seq_len', 'skip_first']
        """
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "batch_size"}


class Compressed:
    """A compressed model: the rewritten program, the recipe that made it, and its report.

    `base_model` has the base architecture and every weight the program uses; after `load` of a
    self-contained directory the weights the compression dropped are zeros there, so the dense
    model (for comparisons) comes from `dense_model()`.
    """

    def __init__(self, program: torch.export.ExportedProgram, recipe: Recipe, report: Report,
                 base_model: torch.nn.Module, dense: torch.nn.Module | None = None) -> None:
        self.program = program
        self.recipe = recipe
        self.report = report
        self.base_model = base_model
        self._dense = dense
        self.source_dir: Path | None = None  # the directory `load` read, if any
        # (dtype or None, device) `load` was asked to run the model in; the dense model follows
        self.placement: tuple[torch.dtype | None, torch.device] | None = None

    def dense_model(self) -> torch.nn.Module | None:
        """The uncompressed base model: the one compressed in this process, else the recorded base
        when it still exists and its weights hash to the recorded provenance; None otherwise.

        Example:
            >>> load("out/llama-25").dense_model() is None  # doctest: +SKIP
            False
        """
        base = self.recipe.base_model
        if self._dense is None and base and (base.startswith("builtin:") or Path(base).exists()):
            model = resolve_model(base, dtype=self.recipe.options.get("dtype"))
            if self.recipe.base_sha256 in (None, weights_sha256(model)):  # checked as stored, then placed
                self._dense = model if self.placement is None else model.to(device=self.placement[1],
                                                                             dtype=self.placement[0])
        return self._dense

    def module(self) -> torch.nn.Module:
        """A runnable module: `(input_ids, attention_mask) -> logits / last_hidden_state`."""
        return self.program.module()

    def dense_gone(self) -> str:
        """Why `dense_model()` is None, for a one-line note.

        Example:
            >>> load("out/llama-25").dense_gone()  # doctest: +SKIP
            "the base model '/models/llama' is gone or changed (weights hash)"
        """
        return f"the base model '{self.recipe.base_model}' is gone or changed (weights hash)"

    def save(self, directory: str | Path, force: bool = False) -> Path:
        """Write a self-contained compressed directory atomically: the kept and bypass weights
        (model.safetensors), config.json, tokenizer and generation config of the base,
        modeling_subfit.py (transformers loads it with trust_remote_code=True), recipe.json and
        report.json / .md / .html. `load(directory)` needs nothing else.

        Example:
            >>> compressed.save("out/llama-25")  # doctest: +SKIP
        """
        directory = Path(directory)
        base = self.recipe.base_model
        base_dir = Path(gguf_directory(base) if is_gguf(base) else base) if base and not base.startswith(
            "builtin:") else None
        if base_dir is None or not base_dir.is_dir():
            base_dir = self.source_dir  # re-saving a loaded directory: its own tokenizer files
        from transformers import PreTrainedModel  # here: importing it costs seconds at `import subfit_fx`

        if self.recipe.base_sha256 is None and isinstance(self.base_model, PreTrainedModel):
            self.recipe.base_sha256 = weights_sha256(self._dense or self.base_model)
        with atomic_dir(directory, force=force) as tmp:
            notes = write_standalone(self.program, self.recipe, self.base_model, tmp, base_dir)
            self.recipe.save(tmp, weights=not is_standalone(tmp))
            self.report.notes += [n for n in notes if n not in self.report.notes]
            (tmp / "report.json").write_text(dumps(self.report.to_json(), "report.json"))
            (tmp / "report.md").write_text(self.report.to_markdown())
            write_html_report(tmp)
        return directory


def calibration_batches(calib: Any, model: torch.nn.Module, config: CalibrationConfig | None = None, *,
                        model_path: str | None = None, tokenizer: Any = None) -> list[Batch]:
    """Token batches from a text file path, an (N, L) id tensor, or (ids, mask) batches.

    Example:
        >>> len(calibration_batches(torch.zeros(4, 8, dtype=torch.long), None, CalibrationConfig(batch_size=2)))
        2
    """
    config = config or CalibrationConfig()
    if isinstance(calib, str | Path):
        tok = tokenizer or load_tokenizer(model, model_path)
        return text_batches(calib, tok, samples=config.samples, seq_len=config.seq_len,
                            batch_size=config.batch_size, seed=config.seed,
                            max_len=max_positions(model) if model is not None else None)
    if isinstance(calib, torch.Tensor):
        limit = max_positions(model) if model is not None else None
        if limit is not None and calib.shape[-1] > limit:
            raise InputError(f"calibration sequences have {calib.shape[-1]} tokens, more than the model's "
                             f"{limit} positions; use shorter sequences")
    return token_batches(calib, config.batch_size)


def _resolve(model: Any, load: dict[str, Any]) -> tuple[torch.nn.Module, str | None]:
    """(model, the spec a recipe records); `load`: dtype, device, revision, trust_remote_code."""
    from subfit_fx.devices import place

    if isinstance(model, str | Path):
        # a Hub id becomes its snapshot directory: a local path like any other from here on
        spec = local_spec(str(model), load.get("revision"), trust_remote_code=load.get("trust_remote_code", False))
        resolved = resolve_model(spec, dtype=load.get("dtype"), device=load.get("device") or "auto",
                                 trust_remote_code=load.get("trust_remote_code", False))
        return resolved, spec if spec.startswith("builtin:") else str(Path(spec).resolve())
    if isinstance(model, torch.nn.Module):
        # an in-memory model stays where it is unless told otherwise
        return place(model, load.get("dtype"), load.get("device")).eval(), None
    raise InputError(f"model must be an nn.Module, a model directory, a Hub id or builtin:ARCH, not "
                     f"{type(model).__name__}")


def _resolve_offloaded(model: Any, load: dict[str, Any]) -> tuple[torch.nn.Module, str, Any]:
    """(a model with no weight in memory, the spec a recipe records, its `OffloadedWeights`)."""
    from subfit_fx.devices import resolve_device
    from subfit_fx.offload import OffloadedWeights, empty_model

    if not isinstance(model, str | Path):
        raise InputError("weight offload reads the checkpoint from disk: pass the model as a directory, Hub id "
                         "or .gguf file, not an in-memory module")
    if load.get("device") not in (None, "auto") and resolve_device(load["device"]).type != "cpu":
        raise InputError("weight offload runs on the CPU in this version: pass --device cpu or leave "
                         "--offload-weights out")
    spec = local_spec(str(model), load.get("revision"), trust_remote_code=load.get("trust_remote_code", False))
    if spec.startswith("builtin:"):
        raise InputError("weight offload reads a checkpoint, and built-in models have none: save the model "
                         "with save_pretrained() and pass its directory")
    directory = gguf_directory(spec) if is_gguf(spec) else Path(spec)
    module = empty_model(directory, load.get("dtype"), trust_remote_code=load.get("trust_remote_code", False))
    return module, str(Path(spec).resolve()), OffloadedWeights(directory, module)


def _check_finite_weights(module: torch.nn.Module) -> None:
    """Refuse weights that hold NaN or Inf, naming the first, before any calibration: every policy
    would otherwise fail later on statistics downstream of it, naming a later branch."""
    for name, p in module.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not bool(torch.isfinite(p).all()):
            raise ModelLoadError(f"weight {name} holds NaN or Inf; the checkpoint is corrupt or was saved from a "
                                 "diverged run: load a good one")


def compress(model: Any, calib: Any, sparsity: float = 0.25, method: str = DEFAULT_METHOD, *,
             calibration: CalibrationConfig | None = None, tokenizer: Any = None, progress: bool = True,
             session_factory: Callable[..., Session] | None = None, dtype: str | torch.dtype | None = None,
             device: str | torch.device | None = None, revision: str | None = None, trust_remote_code: bool = False,
             offload_weights: bool = False, heal: int = 0, heal_lr: float = HEAL_LR, **options: Any) -> Compressed:
    """Compress `model` to `sparsity` (net fraction of transformer-block parameters) with `method`.

    `calib`: a text file (tokenized with the model's tokenizer, chunked into `samples`
    sequences of `seq_len`), an (N, L) token tensor, or a list of (ids, mask) batches.
    `calibration` holds the calibration settings; its fields may also be given as keywords
    (`samples=32`), which override it. The other `options` go to the method (for SubFit: see
    `SubfitOptions`). `session_factory` (default
    `prepare`) picks the calibration pipeline, e.g. `subfit_fx.pipelines.SessionFactory("sequential")`
    (layer by layer) or a data-parallel one under torchrun (docs/distributed.md). A model given by
    name (a directory, Hub id at `revision`, .gguf or builtin:ARCH) loads in `dtype` (default: the
    checkpoint's) on `device` (default "auto": cuda when available); an nn.Module is moved only
    when `dtype` / `device` are given. Statistics and fits are float64 whatever the dtype; the
    recipe records the dtype and stores its bypass weights in it.

    `offload_weights` (a model given by name, the sequential pipeline, CPU): the model is captured
    with no weight in memory and each layer's weights are read from the checkpoint only while the
    layer-wise pipeline runs it (`subfit_fx.offload`), so calibration needs one layer's weights;
    policies that run the whole model (the output judge) refuse it with the fix. The weights the
    compressed model keeps are read at the end.

    `heal` (epochs, default 0: off): after the policy, train the recipe's bypass tensors for that
    many passes over the calibration batches against the dense model's output (Adam at `heal_lr`,
    `subfit_fx.heal`); kept weights never change. Training on calibration data: report healed
    models as such.

    Example:
        >>> from subfit_fx.zoo import tiny_model
        >>> c = compress(tiny_model("gpt2", layers=4), torch.randint(0, 128, (4, 16)), 0.3, progress=False)
        >>> len(c.recipe.replacements) > 0
        True
    """
    target = check_sparsity(sparsity)
    policy = check_method(method).policy
    config = CalibrationConfig.take(options, calibration)
    # strict (a misspelt key fails here, before any long work); the calibration's holdout reaches
    # options classes that declare one (SubFit's held-out scoring checks it)
    typed = method_options(method, options, **({"holdout": config.holdout} if config.holdout else {}))
    check_heal(heal, heal_lr)
    if offload_weights:
        check_offloadable(method, typed)
        if heal:
            raise InputError("heal trains through the whole model, which offload_weights never holds in memory; "
                             "drop heal or offload_weights")
    loading = {"dtype": dtype, "device": device, "revision": revision, "trust_remote_code": trust_remote_code}
    module, spec, weights = _resolve_offloaded(model, loading) if offload_weights else (*_resolve(model, loading), None)
    if weights is None:
        _check_finite_weights(module)
    batches = calibration_batches(calib, module, config, model_path=spec, tokenizer=tokenizer)
    batches = to_device(batches, module_device(module))
    fit_batches, held = split_batches(batches, config.holdout)
    if config.holdout and not held:
        raise InputError("holdout needs at least two calibration sequences; pass more --samples")
    torch.manual_seed(config.seed)
    ep = capture(module)
    branches = find_branches(ep)
    block = count_block_params(ep, branches)
    session = (session_factory or prepare)(ep, branches, skip_first=config.skip_first, progress=progress)
    if weights is not None:
        session.offload_weights(weights)
    ctx = PolicyContext(session, fit_batches, held, block, target, is_causal_lm(module), typed)
    recipe = policy(ctx)
    if heal:
        healed = heal_recipe(ep, recipe, batches, causal=ctx.causal, epochs=heal, lr=heal_lr,
                             progress=progress)
        recipe.tensors.update(healed.tensors)
        recipe.options = {**recipe.options, "heal": heal, "heal_lr": heal_lr}
        ctx.notes.append(healed.note() if healed.steps else "heal: the recipe has no bypass tensors to train")
    recipe.base_model = spec
    recipe.options = {**recipe.options, **config.recorded(), "method": method, "dtype": dtype_name(model_dtype(module))}
    program = apply_recipe(ep, recipe, check=False, branches=branches)
    if weights is not None:  # provenance and the kept weights, one tensor at a time
        recipe.base_sha256 = weights.sha256(module)
        weights.fill(program, module)
    report = build_report(method, target, recipe, branches, block, count_params(ep), count_params(program),
                          ctx.scores, recipe.options, ctx.notes)
    if abs(report.sparsity_actual - target) > BUDGET_TOLERANCE:
        report.notes.append(f"budget: landed at {report.sparsity_actual:.2%} for a {target:.2%} target, more than "
                            f"{BUDGET_TOLERANCE:.1%} away: the nearest this method's units (whole layers or "
                            "branches) reach; compare it with others at this actual sparsity")
    return Compressed(program, recipe, report, module, dense=module if weights is None else None)


def load(directory: str | Path, model: torch.nn.Module | None = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None) -> Compressed:
    """Load a compressed directory without re-calibration: from its own weights when it is
    self-contained (what `save` writes), else by re-applying its recipe to its base model (or to
    `model`, which is then also the dense model). `dtype` / `device` (as for `resolve_model`;
    None: as stored, on the cpu) say where the loaded model runs: it is captured there.

    Example:
        >>> c = load("out/llama-25", dtype="bfloat16", device="cpu")  # doctest: +SKIP
    """
    from subfit_fx.devices import check_dtype_on_device, resolve_device, resolve_dtype

    directory = Path(directory)
    recipe = Recipe.load(directory)
    place = resolve_dtype(dtype), resolve_device(device or "cpu")
    if place[0] is not None:
        check_dtype_on_device(place[0], place[1])
    dense = model
    if model is None and is_standalone(directory):
        model = load_base_skeleton(directory)
    elif model is None:
        if recipe.base_model is None:
            raise InputError(f"recipe in '{directory}' was made from an in-memory model; pass it: "
                             "load(dir, model=...)")
        model = dense = resolve_model(recipe.base_model, dtype=recipe.options.get("dtype"))
    if dtype is not None or device is not None:
        model = model.to(device=place[1], dtype=place[0])
    ep = capture(model)
    program = apply_recipe(ep, recipe)
    report_path = directory / "report.json"
    if report_path.is_file():
        labels = {b["label"] for b in recipe.branches}
        data = read_json(report_path, lambda data, path: check_report(data, path, labels))
        report = Report(**{k: v for k, v in data.items() if k in Report.__dataclass_fields__})
    else:
        report = Report(method=recipe.method, sparsity_target=float(recipe.options.get("sparsity", 0.0)))
    compressed = Compressed(program, recipe, report, model, dense=dense)
    compressed.source_dir = directory
    compressed.placement = place if (dtype is not None or device is not None) else None
    return compressed
