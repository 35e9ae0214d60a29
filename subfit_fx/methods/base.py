"""What every policy gets (`PolicyContext`) and shared helpers (held-out loss, fits per branch).

Example:
    >>> issubclass(PolicyContext, object)
    True
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from subfit_fx.branches import Branch
from subfit_fx.calibrate import Session
from subfit_fx.data import Batch
from subfit_fx.errors import InputError
from subfit_fx.evaluation import next_token_loss
from subfit_fx.fit import Fit, head_on_basis, reduced_rank, removal, ridge, shared_basis
from subfit_fx.stats import BranchStats

__all__ = ["NoOptions", "OutputJudge", "PolicyContext", "build_options", "context_batch", "default_ranks",
           "dense_reference", "fit_branch", "heldout_loss", "kept_norm_params"]


@dataclass(frozen=True)
class NoOptions:
    """The options of a policy that takes none."""


def build_options(cls: type, values: dict[str, Any], method: str = "this method") -> Any:
    """`cls(**values)`, where a key `cls` does not have is an error naming the nearest valid one.

    Options classes are frozen dataclasses that validate themselves on construction.

    Example:
        >>> from subfit_fx.methods.subfit import SubfitOptions
        >>> build_options(SubfitOptions, {"atention_rank": 8}, "subfit")
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: unknown option 'atention_rank' for subfit; did you mean 'attention_rank'? ...
        >>> from subfit_fx.methods.saap import SaapOptions
        >>> build_options(SaapOptions, {"heads": "False"}, "saap")
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: option 'heads' for saap must be True or False, got 'False'
    """
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise InputError(f"unknown option '{key}' for {method}; {hint}(valid: {', '.join(valid) or 'none'})")
    flags = {f.name: f.type in ("bool | None", bool | None) for f in fields(cls)
             if f.type in ("bool", bool, "bool | None", bool | None)}  # name -> whether None may stand
    for key in flags.keys() & values.keys():
        if not isinstance(values[key], bool) and not (flags[key] and values[key] is None):
            # "False" from a config file is truthy: never read it as True
            raise InputError(f"option '{key}' for {method} must be True or False, got {values[key]!r}")
    return cls(**values)


@dataclass
class PolicyContext:
    """Inputs of a policy: a probed session, calibration batches (fit and held-out parts), the
    parameter budget, and the method's options (its options object; a dict is checked on use)."""

    session: Session
    batches: list[Batch]
    holdout: list[Batch]
    block_params: int
    target: float
    causal: bool
    options: Any = field(default_factory=dict)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> score name -> value
    notes: list[str] = field(default_factory=list)

    @property
    def branches(self) -> list[Branch]:
        """All branches in graph order."""
        return self.session.branches

    def options_as(self, cls: type) -> Any:
        """The options as a `cls` (an options object passes through; a dict is built strictly).

        Example:
            >>> PolicyContext(None, [], [], 0, 0.25, True, {}).options_as(NoOptions)
            NoOptions()
        """
        return self.options if isinstance(self.options, cls) else build_options(cls, dict(self.options))

    def record_score(self, label: str, name: str, value: float) -> None:
        """Keep a score for the report."""
        self.scores.setdefault(label, {})[name] = float(value)


@torch.no_grad()
def dense_reference(session: Session, batches: list[Batch]) -> list[torch.Tensor]:
    """Outputs of the session's graph with no replacement (the dense model) for `batches`."""
    session.clear_replacements()
    return [session.forward(b) for b in batches]


@torch.no_grad()
def heldout_loss(session: Session, batches: list[Batch], causal: bool,
                 reference: list[torch.Tensor] | None = None) -> float:
    """Loss of the session's current graph on held-out batches: next-token NLL for causal LMs,
    output MSE relative to the dense reference's energy for encoders.

    Example:
        >>> heldout_loss(session, held, causal=True)  # doctest: +SKIP
    """
    total, count = 0.0, 0.0
    for i, batch in enumerate(batches):
        ids, mask = batch
        out = session.forward(batch)
        if causal:
            nll, _, tokens = next_token_loss(out, ids, mask)
            total, count = total + nll, count + tokens
        else:
            ref = reference[i] if reference is not None else out
            keep = mask > 0
            total += float(((out - ref)[keep] ** 2).sum())
            count += float((ref[keep] ** 2).sum())
    return total / max(count, 1e-30)


class OutputJudge:
    """Damage at the model's output on held-out batches, relative to the dense model.

    Causal LMs: mean KL(dense || current) of the next-token distributions per token (always >= 0,
    far less noisy than a loss difference, and it does not fit the held-out labels). Encoders: the
    output energy lost, ||out - dense||^2 / ||dense||^2 over real tokens. The dense outputs are
    computed once, at construction, with no replacement set. `judge(start=label)` reruns only
    from branch `label` on (`ResumableForward`): valid when only that branch's or later
    branches' replacements changed since the last full `judge()`.

    `context` > 0 (causal LMs) adds `context` x the context gain lost: the dense model predicts a
    passage's continuation better after its own text than after another sequence's (the gain, in
    nats per token); KL over whole windows barely sees a replacement that erodes that gain (most
    tokens are predictable locally), a passage-level task does. Each held-out sequence's
    continuation (a quarter window after its first half) is also run after the next sequence's
    text (a quarter window): half a window more per sequence and judge call (`context_batch`).

    Example:
        >>> judge = OutputJudge(session, held, causal=True); judge()  # doctest: +SKIP
        0.0
    """

    def __init__(self, session: Session, batches: list[Batch], causal: bool, context: float = 0.0) -> None:
        if context < 0:
            raise InputError(f"context={context} must be >= 0 (the weight of the context gain lost)")
        self.session, self.batches, self.causal, self.context = session, list(batches), causal, context
        self.calls = 0
        self._swapped = context_batch(self.batches) if causal and context > 0 else None
        run_batches = self.batches + ([self._swapped[0]] if self._swapped is not None else [])
        self._run = session.resumable(run_batches)
        with session.replaced():  # the dense model, whatever is set now
            outs = self._run.forward_all()
            self.reference = [self._prepare(out, b) for out, b in zip(outs, self.batches)]
            self.reference_gain = self._gain(outs) if self._swapped is not None else 0.0

    def _prepare(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        keep = batch[1] > 0
        if self.causal:
            return torch.log_softmax(out[keep].float(), dim=-1)
        return out[keep].double()

    def of(self, fits: dict[str, Fit], input_kind: str = "normalized") -> float:
        """The divergence with exactly `fits` replacing their branches (the rest dense); the
        session's replacements are left as they were.

        Example:
            >>> judge.of({"model.layers.1.mlp": fit})  # doctest: +SKIP
            0.012
        """
        with self.session.replaced(fits, input_kind):
            return self()

    @torch.no_grad()
    def __call__(self, start: str | None = None) -> float:
        """Divergence of the session's current graph (replacements as set) from the dense model;
        `start`: rerun only from that branch on (see the class docstring)."""
        self.calls += 1
        total, count = 0.0, 0.0
        outs = self._run.forward_all() if start is None else self._run.forward_from(start)
        for ref, batch, raw in zip(self.reference, self.batches, outs[:len(self.batches)], strict=True):
            out = self._prepare(raw, batch)
            if self.causal:
                total += float((ref.exp() * (ref - out)).sum())
                count += ref.shape[0]
            else:
                total += float(((out - ref) ** 2).sum())
                count += float((ref ** 2).sum())
        damage = total / max(count, 1e-30)
        if self._swapped is not None:
            damage += self.context * max(0.0, self.reference_gain - self._gain(outs))
        return damage

    def _gain(self, outs: list[torch.Tensor]) -> float:
        """Mean log-probability per continuation token after the passage's own text minus after
        another sequence's (`context_batch`)."""
        _, rows, own_at, length = self._swapped
        own, other = outs[0][rows], outs[-1]
        # from the continuation's second token on: the first one's prediction reads the token
        # just before it, which differs between the two texts even without any attention
        tokens = self.batches[0][0][rows, own_at + 1:own_at + length, None]

        def logp(logits: torch.Tensor, at: int) -> torch.Tensor:
            return torch.log_softmax(logits[:, at:at + length - 1].float(), dim=-1).gather(-1, tokens)

        # in the swapped batch the continuation starts after `length` tokens of the other text
        return float((logp(own, own_at) - logp(other, length)).double().mean())


def context_batch(batches: list[Batch]) -> tuple[Batch, torch.Tensor, int, int]:
    """For `OutputJudge`'s context gain: (a batch of each full sequence's continuation after the
    next full sequence's text, the rows of the first batch used, where the continuation starts in
    a row, its length, which is also where it starts in the new batch). A row's continuation is the
    quarter window after its first half; the text before it is the next row's quarter window
    before its first half.

    Example:
        >>> ids = torch.arange(32).reshape(2, 16)
        >>> swapped, rows, own_at, n = context_batch([(ids, torch.ones_like(ids))])
        >>> swapped[0].tolist(), own_at, n
        ([[20, 21, 22, 23, 8, 9, 10, 11], [4, 5, 6, 7, 24, 25, 26, 27]], 8, 4)
    """
    ids, mask = batches[0]
    width = int(ids.shape[1])
    length = width // 4
    at = width // 2
    rows = torch.nonzero(mask[:, :at + length].all(dim=1)).flatten()
    if len(rows) < 2 or length < 2:
        raise InputError("the context-gain judge needs at least 2 held-out sequences of 8 tokens or more "
                         "without padding; pass context=0 or longer calibration sequences")
    own = ids[rows]
    other = own.roll(-1, dims=0)
    swapped = torch.cat([other[:, at - length:at], own[:, at:at + length]], dim=1)
    return (swapped, torch.ones_like(swapped)), rows, at, length


def kept_norm_params(branch: Branch, input_kind: str) -> int:
    """Parameters a bypass keeps alive by reading the branch's normalized input (the norm's weight).

    Example:
        >>> kept_norm_params(branch, "stream")  # doctest: +SKIP
        0
    """
    return branch.norm_params if input_kind == "normalized" and branch.normalized else 0


def default_ranks(width: int, options: dict[str, Any]) -> tuple[int, int]:
    """(attention rank, FFN basis size) from options, defaulting to width/8 and width/2.

    Example:
        >>> default_ranks(256, {})
        (32, 128)
    """
    rank = options.get("attention_rank") or max(1, width // 8)
    basis = options.get("ffn_basis") or max(1, width // 2)
    return int(rank), int(basis)


def fit_branch(branch: Branch, stats: BranchStats, form: str, input_kind: str, *, rank: int = 0,
               basis: torch.Tensor | None = None, lam: float = 1e-3) -> Fit:
    """Fit one branch's bypass of the given form from its statistics.

    Example:
        >>> fit_branch(b, stats, "lowrank", "normalized", rank=8)  # doctest: +SKIP
    """
    gram, cross, y_sq = stats.gram[input_kind], stats.cross[input_kind], stats.scalars["y_sq"]
    if form == "remove":
        return removal(gram, y_sq, branch.width)
    if form == "linear":
        return ridge(gram, cross, y_sq, lam)
    if form == "lowrank":
        return reduced_rank(gram, cross, y_sq, rank, lam)
    if form == "shared":
        assert basis is not None
        return head_on_basis(gram, cross, y_sq, basis, lam)
    raise ValueError(form)


def basis_for(stats: dict[str, BranchStats], labels: list[str], input_kind: str, size: int,
              lam: float) -> torch.Tensor:
    """Shared FFN input basis fitted on the given branches' statistics."""
    return shared_basis([stats[label].gram[input_kind] for label in labels],
                        [stats[label].cross[input_kind] for label in labels], size, lam)
