"""Block matching: each wide layer learns to reproduce the residual update of the layers it replaced.

Logit distillation (`--loss distill`) only says that the final next-token distributions should agree
on the training text; the wide layers may get there by fitting that text. Block matching asks more:
on the same input hidden state, a wide layer's update should equal the update of the original
layers run one after another -- the function LP changed, on every hidden dimension.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.arch import layer_hidden
from ...utils.errors import UserError
from .model import layer_input, run_layers


class _StopForward(Exception):
    """Raised after the last wide layer when nothing after it is needed (`--loss blocks`)."""


def check_one_attention_type(config: Any) -> None:
    """A wide layer's mask is the one of its own position; with sliding-window and full-attention layers
    mixed, the layers it replaced may need another, so the targets would be wrong."""
    types = set(getattr(config, "layer_types", None) or [])
    if len(types) > 1:
        raise UserError(
            f"--loss blocks and --block-weight need one attention type in every layer; this model "
            f"mixes {', '.join(sorted(types))}. Use --loss distill without --block-weight."
        )


class BlockMatch:
    """Relative error of every wide layer's update against the original layers' update on the same input.

    `members[i]` lists the original layer indices that student layer `i` replaced. Hooks capture each
    wide layer's input (with the layer arguments: mask, rotary embeddings) and output during the
    student's forward; `loss()` then runs the original layers on that input without a graph and
    returns the mean over wide layers of |out - target|^2 / |target - input|^2.

    `local=True` (`--loss blocks`): each wide layer sees its input detached, so it learns only its own
    update, and the forward stops after the last wide layer (no head, no teacher logits).
    """

    def __init__(
        self, student_layers: Any, teacher_layers: Any, members: dict[int, tuple[int, ...]], local: bool = False
    ):
        self.teacher_layers, self.members, self.local = teacher_layers, members, local
        self._captured: dict[int, tuple[tuple, dict, torch.Tensor]] = {}
        self._last = max(members)
        self._hooks = []
        for i in members:
            layer = student_layers[i]
            if local:
                self._hooks.append(layer.register_forward_pre_hook(self._detach_input, with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(self._capture(i), with_kwargs=True))

    @staticmethod
    def _detach_input(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (args[0].detach(),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}

    def _capture(self, i: int):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            self._captured[i] = (args, kwargs, layer_hidden(output))
            if self.local and i == self._last:
                raise _StopForward

        return hook

    def run_student(self, student: Any, ids: torch.Tensor) -> Any:
        """The student's forward; None when it stopped after the last wide layer (`local`)."""
        try:
            return student(input_ids=ids, use_cache=False)
        except _StopForward:
            return None

    def loss(self) -> torch.Tensor:
        if len(self._captured) != len(self.members):
            # programming error: train() runs the student's forward before loss()
            raise RuntimeError("BlockMatch: run the student forward first (a wide layer was not reached).")
        errors = []
        for i, (args, kwargs, out) in sorted(self._captured.items()):
            h = layer_input(args, kwargs).detach()
            with torch.no_grad():
                target = run_layers([self.teacher_layers[j] for j in self.members[i]], h, args, kwargs)
                scale = (target.float() - h.float()).pow(2).mean().clamp_min(1e-12)
            errors.append((out.float() - target.float()).pow(2).mean() / scale)
        self._captured.clear()
        return torch.stack(errors).mean()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
