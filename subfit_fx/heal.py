"""Healing: a short, optional training of a recipe's bypass weights against the dense model.

Every policy fits its bypasses in closed form, each branch on its own statistics; compounding
(a bypass sees the inputs that earlier replacements produce) is only judged, never fitted.
Healing trains the recipe's tensors, nothing else, so that the compressed model's output
matches the dense model's on the calibration batches: the KL divergence of the next-token
distributions for causal LMs, the mean squared error of the last hidden states (relative to
their mean square) for encoders. The kept weights never change, so the result is still the
base model plus a recipe, saved, loaded and exported as before. A removed branch has no tensor
and stays removed.

Cost: `epochs` x (one forward and one backward of the compressed model + one forward of the
dense model) per calibration batch, and the memory of a backward through the whole model (the
activations of one batch). It is training on the calibration set: compare healed models with
healed ones (quality tables name it), and never heal on evaluation text.

Example:
    >>> from subfit_fx.zoo import tiny_model
    >>> model = tiny_model("llama", layers=4)
    >>> calib = torch.randint(0, 128, (8, 16))
    >>> c = subfit_fx.compress(model, calib, 0.3, judge="statistics", heal=2, progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from subfit_fx.data import Batch
from subfit_fx.errors import InputError
from subfit_fx.recipe import Recipe
from subfit_fx.rewrite import apply_recipe

__all__ = ["HEAL_LR", "HealResult", "check_heal", "heal_recipe", "output_loss"]

HEAL_LR = 3e-4  # Adam; dev half of the quality benchmark, SmolLM2 at 25 % (3e-4 beat 1e-4: quality_findings.md)
PREFIX = "subfit."  # recipe tensors live under this name in a rewritten program's state dict


@dataclass
class HealResult:
    """What healing did: loss on the calibration batches in the first and in the last epoch (the
    mean over batches, each measured before its step), and how many steps ran."""

    tensors: dict[str, torch.Tensor]
    first_epoch_loss: float
    last_epoch_loss: float
    steps: int

    def note(self) -> str:
        """One line for the report."""
        return (f"healed: {len(self.tensors)} recipe tensors trained {self.steps} steps against the dense output; "
                f"calibration loss {self.first_epoch_loss:.4g} (first epoch) -> {self.last_epoch_loss:.4g} (last)")


def check_heal(heal: object, heal_lr: object = HEAL_LR) -> None:
    """Raise `InputError` unless `heal` (epochs) is an integer >= 0 and `heal_lr` a positive number
    (the names of `compress`'s keywords).

    Example:
        >>> check_heal(2)
        >>> check_heal(-1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        subfit_fx.errors.InputError: heal=-1 must be a number of epochs >= 0...
    """
    if isinstance(heal, bool) or not isinstance(heal, int) or heal < 0:
        raise InputError(f"heal={heal!r} must be a number of epochs >= 0 (0: no healing); pass e.g. heal=2")
    if isinstance(heal_lr, bool) or not isinstance(heal_lr, int | float) or not heal_lr > 0:
        raise InputError(f"heal_lr={heal_lr!r} must be a positive learning rate; pass e.g. heal_lr={HEAL_LR}")


def output_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Distance of a compressed model's output to the dense one's over the real (mask 1)
    positions: KL(dense || compressed) of the next-token distributions (causal LMs), else the
    squared error of the hidden states relative to the dense ones' mean square.

    Example:
        >>> x = torch.randn(2, 3, 5)
        >>> float(output_loss(x, x, torch.ones(2, 3), causal=True))
        0.0
    """
    real = mask.bool()
    if causal:
        t = torch.log_softmax(teacher.float(), dim=-1)
        s = torch.log_softmax(student.float(), dim=-1)
        return (t.exp() * (t - s)).sum(-1)[real].mean()
    diff = (student.float() - teacher.float())[real]
    return diff.pow(2).mean() / teacher.float()[real].pow(2).mean().clamp_min(1e-12)


def heal_recipe(ep: torch.export.ExportedProgram, recipe: Recipe, batches: Sequence[Batch], *, causal: bool,
                epochs: int = 2, lr: float = HEAL_LR, progress: bool = True) -> HealResult:
    """Train `recipe`'s tensors (bypass weights and biases) with Adam for `epochs` passes over
    `batches` so that `apply_recipe(ep, recipe)` matches the dense program `ep` at the output
    (`output_loss`). Returns the trained tensors (same keys, dtypes and devices as the recipe's)
    and the losses; `ep`, `recipe` and the model's weights are left unchanged.

    Example:
        >>> result = heal_recipe(ep, recipe, batches, causal=True, epochs=2)  # doctest: +SKIP
        >>> recipe.tensors.update(result.tensors)  # doctest: +SKIP
    """
    check_heal(epochs, lr)
    if not recipe.tensors or epochs == 0 or not batches:
        return HealResult({}, float("nan"), float("nan"), 0)
    dense = ep.module()
    # the rewrite wraps recipe tensors of the activations' dtype as parameters without a copy
    # (a loaded recipe): train copies, so the caller's recipe and program never change
    work = dataclasses.replace(recipe, tensors={k: v.detach().clone() for k, v in recipe.tensors.items()})
    student = apply_recipe(ep, work, check=False).module()
    params = dict(student.named_parameters())
    train = {key: params[PREFIX + key] for key in recipe.tensors if PREFIX + key in params}
    # the program shares the model's parameters: only the recipe's tensors may learn, and every
    # flag is restored afterwards
    flags = {name: p.requires_grad for name, p in params.items()}
    for name, p in params.items():
        p.requires_grad_(name.startswith(PREFIX) and name[len(PREFIX):] in train)
    optimizer = torch.optim.Adam(list(train.values()), lr=lr)
    losses: list[list[float]] = []
    bar = tqdm(total=epochs * len(batches), desc="healing bypasses", unit="step", leave=False, disable=not progress)
    try:
        for _ in range(epochs):
            losses.append([])
            for ids, mask in batches:
                with torch.no_grad():
                    teacher = dense(ids, mask)
                loss = output_loss(student(ids, mask), teacher, mask, causal)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses[-1].append(float(loss.detach()))
                bar.update()
                bar.set_postfix(loss=f"{losses[-1][-1]:.4g}")
    finally:
        bar.close()
        for name, p in params.items():
            p.requires_grad_(flags[name])
    tensors = {key: p.detach().clone().to(recipe.tensors[key].dtype) for key, p in train.items()}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return HealResult(tensors, mean(losses[0]), mean(losses[-1]), sum(map(len, losses)))
