"""Make transformed models first-class Hugging Face models.

For every supported architecture, truedepth registers a config and a model subclass with the
Auto classes (model type ``truedepth_<arch>``). They inherit everything from the original class
and override only construction: layer ``i`` is built ``layer_widths[i]`` layers wide, so
`from_pretrained` finds a tensor of the right shape for every saved weight. A transformed model
adopts these classes, so `save_pretrained` writes a folder that `AutoModelForCausalLM` reloads
(after ``import truedepth``) with no remote code.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModelForCausalLM

from ..utils.errors import UserError
from .arch import SUPPORTED, UnsupportedModelError, new_layer, recorded_widths


class CheckpointMismatchError(UserError, RuntimeError):
    """A checkpoint whose tensors do not match the model it describes."""


def raise_on_loading_problems(info: dict[str, Any], where: Any) -> None:
    problems = {
        k: sorted(map(str, v))
        for k, v in info.items()
        if k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") and v
    }
    if problems:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}" for k, v in problems.items()
        )
        raise CheckpointMismatchError(
            f"the weights in {where} do not match the model its config describes ({detail}). "
            "The folder is incomplete or was edited; save it again from the transformed model."
        )


class TrueDepthModelMixin:
    """Builds wide layers where the recorded plan put them; loads strictly."""

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        for idx, width in enumerate(recorded_widths(config)):
            if width > 1:
                # created in the current default device/dtype (meta inside from_pretrained)
                layer = new_layer(self, config, idx, width, device=None)
                layer.apply(self._init_weights)
                self.model.layers[idx] = layer

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        want_info = kwargs.pop("output_loading_info", False)
        # mismatched shapes are let through only to be reported below by name, then refused
        kwargs.setdefault("ignore_mismatched_sizes", True)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        raise_on_loading_problems(info, args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return (model, info) if want_info else model


TYPE_PREFIX = "truedepth_"  # architecture `arch` is registered as model type truedepth_<arch>
_BY_BASE: dict[type, type] = {}  # original model class -> truedepth subclass
_CONFIG_BY_BASE: dict[type, type] = {}


def _register(arch: str) -> None:
    base_config_cls = AutoConfig.for_model(arch).__class__
    base_model_cls = AutoModelForCausalLM._model_mapping[base_config_cls]
    config_cls = type(
        f"TrueDepth{base_config_cls.__name__}",
        (base_config_cls,),
        {"model_type": f"{TYPE_PREFIX}{arch}", "truedepth_base_model_type": arch, "__module__": __name__},
    )
    model_cls = type(
        f"TrueDepth{base_model_cls.__name__}",
        (TrueDepthModelMixin, base_model_cls),
        {"config_class": config_cls, "__module__": __name__},
    )
    # module attributes, so pickle finds them by name (vLLM sends the config to its engine process)
    globals()[config_cls.__name__] = config_cls
    globals()[model_cls.__name__] = model_cls
    AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
    _BY_BASE[base_model_cls] = model_cls
    _CONFIG_BY_BASE[base_config_cls] = config_cls


def check_adoptable(model: Any) -> None:
    """Raise before a transform if `adopt` could not give the transformed model a truedepth class."""
    cls = type(model)
    if not isinstance(model, TrueDepthModelMixin) and cls not in _BY_BASE:
        names = ", ".join(sorted(c.__name__ for c in _BY_BASE))
        raise UnsupportedModelError(
            f"{cls.__name__} cannot be saved and reloaded as a transformed model; truedepth transforms the "
            f"causal LM classes {names}. Load the model with AutoModelForCausalLM."
        )


def adopt(model: Any) -> Any:
    """Switch a transformed model (and its config) to the registered truedepth classes in place."""
    if isinstance(model, TrueDepthModelMixin):
        return model
    check_adoptable(model)
    cls = type(model)
    model.__class__ = _BY_BASE[cls]
    model.config.__class__ = _CONFIG_BY_BASE[type(model.config)]
    return model


for _arch in SUPPORTED:
    _register(_arch)
