"""Few-parameter calibration of the wide layers (`--calibrate`): per-member vectors multiplied into the weights.

A wide layer runs its members side by side: q/k/v and gate/up rows stacked (member m owns rows block m), o_proj
and down_proj columns side by side (member m owns column block m), and each member's input-norm gain folded into
the columns of its rows. Two kinds of per-member vectors can therefore be trained and folded back exactly:

- scales: member m's attention (MLP) output, one gain per output channel: the rows of its o_proj (down_proj)
  column block times a vector of the hidden size;
- norms: member m's input-norm (post-attention-norm) gain: the columns of its q/k/v (gate/up) row block times a
  vector of the hidden size, one vector shared by q, k and v (gate and up), as the folded norm weight is.

Each is a `torch.nn.utils.parametrize` parametrization W -> W * s (product in float32, cast back to W's dtype as
the transform folds norms), starting at s = 1, so the model computes exactly what it did; `fold` replaces each
weight by its product, leaving an ordinary wide layer of the same names and shapes that every engine serves.
Few parameters cannot memorise the training text's style: the lever of issue 30 that may transfer out of domain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from ...core.arch import COLUMN_SUMS, ROW_GROUPS, decoder_layers, recorded_widths

PARAM = "calibration"  # the trained vector's name inside a parametrization (how the optimizer finds it)


class MemberScale(nn.Module):
    """W * s with one vector per member: s[m] scales the rows of member m's column block (`outputs`, W of shape
    [out, members * k]) or the columns of member m's row block (inputs, W of shape [members * r, in])."""

    def __init__(self, calibration: nn.Parameter, outputs: bool):
        super().__init__()
        self.calibration, self.outputs = calibration, outputs  # shared by q/k/v (gate/up): registered in each

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.calibration
        members = s.shape[0]
        if self.outputs:
            scaled = w.float().view(w.shape[0], members, -1) * s.t()[:, :, None]
        else:
            scaled = w.float().view(members, -1, w.shape[1]) * s[:, None, :]
        return scaled.reshape(w.shape).to(w.dtype)


def calibration_targets(kind: str) -> list[tuple[str, tuple[str, ...], bool]]:
    """(module, its projections sharing one vector, whether the vector scales outputs) for `kind`."""
    targets = []
    if kind in ("scales", "both"):
        targets += [(parent, (name,), True) for parent, name in COLUMN_SUMS]
    if kind in ("norms", "both"):
        targets += [(parent, names, False) for parent, names, _norm in ROW_GROUPS]
    return targets


def add_calibration(model: Any, kind: str) -> list[str]:
    """Parametrize every wide layer of `model` with trainable per-member vectors (all ones) and return their names.

    The vectors are float32 and trainable; nothing else changes (requires_grad of the weights stays as it was).
    """
    layers = decoder_layers(model)
    for i, width in enumerate(recorded_widths(model.config)):
        if width < 2:
            continue
        for parent, names, outputs in calibration_targets(kind):
            module = getattr(layers[i], parent)
            first = getattr(module, names[0]).weight
            size = first.shape[0] if outputs else first.shape[1]  # the hidden size either way
            vector = nn.Parameter(torch.ones(width, size, dtype=torch.float32, device=first.device))
            for name in names:
                parametrize.register_parametrization(getattr(module, name), "weight", MemberScale(vector, outputs))
    return calibration_names(model)


def calibration_names(model: Any) -> list[str]:
    return [n for n, _ in model.named_parameters() if is_calibration(n)]


def is_calibration(name: str) -> bool:
    return name.endswith(f".{PARAM}")


def fold(model: Any) -> Any:
    """Replace every calibrated weight by its product W * s (in place, exactly what the forward computed) and
    drop the parametrizations: the model's parameter names and shapes are those of an uncalibrated one."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, MemberScale) for p in module.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def calibrate_model(model: Any, kind: str, weights_train: bool) -> list[str]:
    """`add_calibration`, and with `weights_train` False freeze everything but the calibration vectors."""
    names = add_calibration(model, kind)
    if not weights_train:
        chosen = set(names)
        for name, p in model.named_parameters():
            p.requires_grad_(name in chosen)
    return names
