"""truedepth: Layer Parallelism for Hugging Face causal LMs.

    import truedepth
    model, tok = truedepth.load("default")
    truedepth.parallelize(model, 20, 28)          # or truedepth.apply_plan(model, "parallel=20:28")
"""

from . import hf as _hf  # noqa: F401  registers truedepth_<arch> with AutoConfig/AutoModelForCausalLM
from .models import load
from .plan import GRAMMAR_HELP, Plan, PlanError, Step, as_plan
from .transform import apply_plan, parallelize

__all__ = ["load", "apply_plan", "parallelize", "Plan", "Step", "PlanError", "as_plan", "GRAMMAR_HELP", "export_gguf"]


def __getattr__(name: str):  # export_gguf imports gguf-py: only when asked for
    if name == "export_gguf":
        from .deploy.gguf import export_gguf

        return export_gguf
    raise AttributeError(f"module 'truedepth' has no attribute {name!r}")
__version__ = "0.1.0"
