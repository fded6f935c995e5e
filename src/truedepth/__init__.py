"""truedepth: Layer Parallelism for Hugging Face causal LMs.

    import truedepth
    model, tok = truedepth.load("default")
    truedepth.parallelize(model, 20, 28)          # or truedepth.apply_plan(model, "parallel=20:28")
    truedepth.save(model, tok, "lp-model")        # model + tokenizer: truedepth.load("lp-model") reloads it

The package is layered; each layer imports only the ones below it (checked by import-linter,
see pyproject.toml): cli -> apps -> deploy -> measure -> runtime -> core -> utils.
"""

import importlib.abc
import sys

from .core import hf as _hf  # noqa: F401  registers truedepth_<arch> with AutoConfig/AutoModelForCausalLM
from .core.loading import load, save
from .core.plan import GRAMMAR_HELP, Plan, PlanError, Step, as_plan
from .core.transform import apply_plan, parallelize
from .utils.errors import UserError

__all__ = [
    "load",
    "save",
    "UserError",
    "apply_plan",
    "parallelize",
    "Plan",
    "Step",
    "PlanError",
    "as_plan",
    "GRAMMAR_HELP",
    "export_gguf",
]
__version__ = "0.1.0"

# Module paths before the layered layout (issue 11) -> where their code lives now.
MOVED = {
    "plan": "truedepth.core.plan",
    "transform": "truedepth.core.transform (the layer anatomy: truedepth.core.arch)",
    "hf": "truedepth.core.hf",
    "models": "truedepth.core.loading",
    "shapes": "truedepth.core.shapes",
    "fastgen": "truedepth.runtime.generate",
    "tp": "truedepth.runtime.distributed.tp",
    "perplexity": "truedepth.measure.eval.perplexity",
    "icl": "truedepth.measure.eval.icl",
    "tasks": "truedepth.measure.eval.tasks",
    "data": "truedepth.measure.eval.data",
    "evaluate": "truedepth.measure.eval.evaluate",
    "bench": "truedepth.measure.bench (decode, run, report, timing)",
    "speed": "truedepth.measure.bench.speed",
    "tp_bench": "truedepth.measure.bench.tp_bench (torchrun -m truedepth.cli.tp_bench)",
    "finetune": "truedepth.apps.finetune (config, model, train, checkpoint, report, pipeline)",
    "search": "truedepth.apps.search (options, space, scoring, beam, report, pipeline)",
    "sweep": "truedepth.apps.sweep (core, tables, plots, report, run)",
    "commands": "truedepth.cli (one module per command)",
}


def _moved_error(old: str) -> ImportError:
    return ModuleNotFoundError(
        f"truedepth.{old} moved to {MOVED[old]} when the package was split into layers; import it from there.",
        name=f"truedepth.{old}",
    )


class _MovedModules(importlib.abc.MetaPathFinder):
    """`import truedepth.<old>` fails with a pointer to the new module instead of a bare 'No module named'."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001
        parts = fullname.split(".")
        if len(parts) >= 2 and parts[0] == __name__ and parts[1] in MOVED:
            raise _moved_error(parts[1])
        return None


def __getattr__(name: str):  # `from truedepth import <old>` and `truedepth.<old>`
    if name == "export_gguf":  # imports gguf-py: only when asked for
        from .deploy.gguf import export_gguf

        return export_gguf
    if name in MOVED:
        raise _moved_error(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())  # last: only asked once no real module matched
