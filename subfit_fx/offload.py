"""Weights that stay on disk: a model captured without its weights in memory, and each layer's
weights brought in only while the layer-wise pipeline runs that layer.

A model bigger than memory cannot be loaded to be captured. `empty_model` builds it from its
config with every parameter allocated but never written (untouched pages are not resident, so a
70B model costs no memory yet) and `capture` traces it without reading a value. `OffloadedWeights`
then puts every parameter of the session's graph on the meta device (anything that reads a weight
outside a layer-wise sweep fails loudly instead of computing with garbage) and, for each segment
of the layer-wise pipeline (`Session.observe_layerwise`), reads exactly that segment's tensors from
the checkpoint's safetensors files before it runs over the batches and drops them after. Peak
memory is then one layer's weights + its statistics + the cached activations (+ the embedding in
the first segment), measured in docs/results/scale.md.

What it bounds: the calibration of policies that need only per-branch statistics (SubFit with
`judge="statistics"`, LLM-Drop; `methods.check_offloadable`). Policies that run whole forwards
(SubFit's output judge, width pruning's inner statistics, the layer baselines' stream distances,
evaluation) need every weight: `compress` refuses them up front, and a session with offloaded
weights raises an `InputError` with the fix on any whole forward.

Example:
    >>> model = empty_model("path/to/model", "bfloat16")  # doctest: +SKIP
    >>> weights = OffloadedWeights("path/to/model", model)  # doctest: +SKIP
    >>> ep = capture(model)  # doctest: +SKIP
    >>> session = Session(ep, find_branches(ep), pipeline=LayerByLayer(), weights=weights)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import fx

from subfit_fx.capture import WRAPPED_PREFIX, check_remote_code, check_weight_files
from subfit_fx.errors import ModelLoadError

__all__ = ["OffloadedWeights", "empty_model", "is_offloaded"]


def empty_model(directory: str | Path, dtype: str | torch.dtype | None = None, *,
                trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of a Hugging Face directory, built from its config with uninitialized weights
    (allocated, never written: not resident until something writes them) and real buffers
    (rotary tables and other values computed at construction), in `dtype` (None: the config's).

    Capture it and calibrate it with `OffloadedWeights` of the same directory; running it as it is
    computes with garbage.

    Example:
        >>> model = empty_model("runs/reference", "bfloat16")  # doctest: +SKIP
    """
    import transformers as tf
    from accelerate import init_empty_weights

    from subfit_fx.devices import resolve_dtype

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"'{path}' is not a model directory (no config.json); weight offload reads a "
                             "local safetensors directory (a Hub id resolves to one first)")
    check_weight_files(path)
    check_remote_code(path, trust_remote_code)
    config = tf.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    cls = tf.AutoModelForCausalLM if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else tf.AutoModel
    wanted = resolve_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(wanted, str):
        wanted = getattr(torch, wanted)
    with init_empty_weights():  # parameters on meta, buffers real
        model = cls.from_config(config, dtype=wanted, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights leaves the tied head its own meta tensor
    fresh: dict[int, torch.nn.Parameter] = {}  # tied parameters stay one tensor
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in fresh:
                    fresh[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=False)
                module._parameters[name] = fresh[id(p)]
    return model.eval()


def is_offloaded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is an offloaded weight's stand-in (a meta tensor).

    Example:
        >>> is_offloaded(torch.empty(2, device="meta")), is_offloaded(torch.empty(2))
        (True, False)
    """
    return tensor.is_meta


def _owner(module: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = target.rpartition(".")
    return (functools.reduce(getattr, path.split("."), module) if path else module), leaf


def _set(module: torch.nn.Module, target: str, tensor: torch.Tensor) -> None:
    owner, leaf = _owner(module, target)
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        setattr(owner, leaf, tensor)


class OffloadedWeights:
    """The weights of a safetensors checkpoint directory, read tensor by tensor when a segment
    needs them (a `Session` weight strategy; see the module docstring).

    A graph's weight `hf.model.layers.0.mlp.up_proj.weight` is the checkpoint's
    `model.layers.0.mlp.up_proj.weight` (the capture wrapper's prefix dropped); `model` (the
    `empty_model` that is captured) names the tied weights, which a checkpoint stores once under
    one of their names (a capture may use another: `lm_head.weight` for a tied embedding). Each is
    converted to the dtype of the graph's stand-in; a shape that differs, or a parameter the
    checkpoint lacks, is a `ModelLoadError`. `bytes_read` counts what was brought in.

    Example:
        >>> model = empty_model("runs/reference")  # doctest: +SKIP
        >>> weights = OffloadedWeights("runs/reference", model)  # doctest: +SKIP
        >>> weights.names()[:1]  # doctest: +SKIP
        ['lm_head.weight']
    """

    def __init__(self, directory: str | Path, model: torch.nn.Module | None = None) -> None:
        self.directory = Path(directory)
        files = check_weight_files(self.directory)
        index = self.directory / "model.safetensors.index.json"
        self._file: dict[str, Path] = {}
        if index.is_file():
            self._file = {k: self.directory / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            for file in files:
                with safe_open(file, "pt") as f:
                    self._file.update(dict.fromkeys(f.keys(), file))
        self._meta: dict[str, tuple[torch.dtype, torch.device]] = {}  # graph target -> stand-in dtype, device
        self.bytes_read = 0
        self._alias: dict[str, str] = {}  # a tied weight's name -> the name the checkpoint stores it under
        if model is not None:
            tied: dict[int, list[str]] = {}
            for name, p in model.named_parameters(remove_duplicate=False):
                tied.setdefault(id(p), []).append(name)
            for names in tied.values():
                stored = [n for n in names if n in self._file]
                if stored:
                    self._alias.update(dict.fromkeys(names, stored[0]))

    def names(self) -> list[str]:
        """The checkpoint's tensor names, sorted.

        Example:
            >>> "model.embed_tokens.weight" in OffloadedWeights("runs/reference").names()  # doctest: +SKIP
            True
        """
        return sorted(self._file)

    def key(self, target: str) -> str:
        """The checkpoint name of graph weight `target`.

        Example:
            >>> OffloadedWeights("runs/reference").key("hf.model.norm.weight")  # doctest: +SKIP
            'model.norm.weight'
        """
        name = target.removeprefix(WRAPPED_PREFIX)
        return self._alias.get(name, name)

    def detach(self, module: fx.GraphModule, state: dict[str, torch.Tensor] | None = None) -> list[str]:
        """Put every weight of `module` (its `get_attr` targets) that the checkpoint holds, and the
        same names in `state` (an `ExportedProgram.state_dict`), on the meta device; returns the
        targets. Buffers the checkpoint does not hold (rotary tables) stay.

        Example:
            >>> weights.detach(session_module, ep.state_dict)  # doctest: +SKIP
        """
        targets = []
        for node in module.graph.nodes:
            if node.op != "get_attr" or node.target in targets:
                continue
            owner, leaf = _owner(module, node.target)
            value = getattr(owner, leaf)
            if not isinstance(value, torch.Tensor) or self.key(node.target) not in self._file:
                if isinstance(value, torch.nn.Parameter):  # buffers may be computed; weights must be stored
                    raise ModelLoadError(f"weight '{self.key(node.target)}' is not in the checkpoint "
                                         f"'{self.directory}'; pass the captured model to OffloadedWeights so "
                                         "that tied weights are found under their stored name")
                continue
            self._meta.setdefault(node.target, (value.dtype, value.device))
            _set(module, node.target, value.to("meta"))
            targets.append(node.target)
        if state is not None:
            for name in list(state):
                if name in self._meta:
                    state[name] = torch.nn.Parameter(state[name].to("meta"), requires_grad=False)
        return targets

    def _load(self, targets: Iterable[str], module: fx.GraphModule) -> dict[str, torch.Tensor]:
        out = {}
        for target in targets:
            key = self.key(target)
            if key not in self._file:
                raise ModelLoadError(f"weight '{key}' is not in the checkpoint '{self.directory}'; weight offload "
                                     "reads each tensor under its own name (tied weights included)")
            stand_in = getattr(*_owner(module, target))
            dtype, device = self._meta.get(target, (stand_in.dtype, torch.device("cpu")))
            tensor = self.read(key, dtype)
            if tuple(tensor.shape) != tuple(stand_in.shape):
                raise ModelLoadError(f"weight '{key}' in '{self._file[key]}' has shape {tuple(tensor.shape)}, "
                                     f"the model's is {tuple(stand_in.shape)}; the checkpoint does not belong to "
                                     "this config")
            out[target] = tensor.to(device)
            self.bytes_read += tensor.numel() * tensor.element_size()
        return out

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """Checkpoint tensor `key` in `dtype`, on the CPU.

        Example:
            >>> weights.read("model.norm.weight", torch.float32).shape  # doctest: +SKIP
            torch.Size([64])
        """
        from safetensors import safe_open

        with safe_open(self._file[key], "pt") as f:
            return f.get_tensor(key).to(dtype)

    def sha256(self, model: torch.nn.Module) -> str:
        """`standalone.weights_sha256` of `model` as loaded from the checkpoint (its values read one
        tensor at a time; buffers the checkpoint lacks as `model` has them): the provenance a
        compressed directory records, without the whole model in memory.

        Example:
            >>> digest = weights.sha256(empty_model("runs/reference"))  # doctest: +SKIP
            >>> digest == weights_sha256(load_model("runs/reference"))  # doctest: +SKIP
            True
        """
        from subfit_fx.standalone import weights_sha256

        return weights_sha256(model, lambda name, t: self.read(self.key(name), t.dtype)
                              if self.key(name) in self._file else t)

    def fill(self, program: torch.export.ExportedProgram, model: torch.nn.Module) -> int:
        """Make `program` (a rewrite of a capture of `model`, an `empty_model`) runnable: read the
        weights it still uses into `model`'s parameters and point the program's meta stand-ins at
        them. The parameters of replaced branches stay unwritten and become zeros that take no
        memory (as in a loaded compressed directory). Returns the bytes read.

        Example:
            >>> weights.fill(compressed_program, model)  # doctest: +SKIP
        """
        used = {self.key(name): name for name, t in program.state_dict.items() if is_offloaded(t)}
        before = self.bytes_read
        for name, param in itertools.chain(model.named_parameters(), model.named_buffers()):
            key = self.key(name)
            if key in used:
                if key not in self._file:
                    raise ModelLoadError(f"weight '{key}' is not in the checkpoint '{self.directory}'; weight "
                                         "offload reads each tensor under its own name")
                param.data = self.read(key, param.dtype)
                self.bytes_read += param.numel() * param.element_size()
                program.state_dict[used[key]] = param
            elif isinstance(param, torch.nn.Parameter):
                param.data = torch.zeros((), dtype=param.dtype).expand(param.shape)
        left = [name for name, t in program.state_dict.items() if is_offloaded(t)]
        if left:
            raise ModelLoadError(f"the compressed program uses '{left[0]}', which is no parameter of the model; "
                                 "weight offload cannot fill it")
        return self.bytes_read - before

    @contextlib.contextmanager
    def onloaded(self, module: fx.GraphModule, targets: Iterable[str]) -> Iterator[None]:
        """Within the block, `module`'s offloaded `targets` hold the checkpoint's values; after
        it they are meta again and the loaded tensors are freed.

        Example:
            >>> with weights.onloaded(segment.module, segment.params):  # doctest: +SKIP
            ...     run_segment(segment, values)
        """
        wanted = [t for t in targets if is_offloaded(getattr(*_owner(module, t)))]
        for target, tensor in self._load(wanted, module).items():
            _set(module, target, tensor)
        try:
            yield
        finally:
            for target in wanted:
                _set(module, target, getattr(*_owner(module, target)).to("meta"))

