"""Tensor parallelism (TP) for base and Layer-Parallel models, under `torchrun`.

Every decoder layer, wide or not, is sharded with PyTorch's tensor-parallel API (DTensor
`parallelize_module`) using the Megatron plan: q/k/v and gate/up column-parallel, o and down
row-parallel. Each rank holds a contiguous slice of every layer's heads and MLP neurons. A wide
LP layer is an ordinary layer with more heads and neurons, so the same plan shards it unchanged;
on 2 ranks a pair's rank 0 holds layer a's heads and rank 1 layer b's (the paper's layout).

One all-reduce follows each row-parallel product, two per layer, so a model of L layers with a
parallel range of Δ layers in pairs costs 2·(L − Δ/2) all-reduces per forward pass. Embeddings,
the final norm and the LM head stay whole on every rank, so they add no collective.

    torchrun --nproc_per_node=2 -m truedepth generate --tp --plan parallel=14:24 ...

NCCL on GPUs (rank r uses cuda:LOCAL_RANK), gloo on CPU. Collectives time out after
`--tp-timeout` seconds, so a rank that dies or hangs makes the others stop with an error.
Commands wire TP with `load_model(..., tp=TPOptions(...))` (or `maybe_shard`); cli/ declares the options.

Two implementations of the same layout and collectives (`--tp-impl`): "dtensor" (PyTorch's
`parallelize_module`) and "local" (the default; `shard_locally`: plain sharded nn.Linear weights
and one `torch.distributed.all_reduce` forward hook per row-parallel layer). "local" is the default
because it was measured faster: on an H200 host DTensor added 1.73 ms of dispatch per Llama-2-7B
layer in eager decode, "local" 0.08 ms (docs/MULTI_GPU.md).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...core.arch import (
    COLUMN_SUMMED,
    HEAD_NORMS,
    ROW_STACKED,
    LayerWidths,
    current_plan,
    decoder_layers,
    layer_widths,
    measured_widths,
    transformed_record,
)
from ...core.plan import as_plan
from ...utils.options import option
from .errors import DEFAULT_TIMEOUT_S, TPError

# re-exported: callers use tp.is_main(), tp.rank(), tp.explain_rank_failures(...) next to tp's own functions
from .process import (  # noqa: F401
    env_world_size,
    explain_rank_failures,
    init_distributed,
    is_main,
    print0,
    quiet_other_ranks,
    rank,
    rank_device,
    sync_seed,
    under_torchrun,
)

# The layer anatomy (core.arch): what a wide layer stacks by rows is split by rows (column-parallel),
# what it places side by side by columns is split by columns (row-parallel, one all-reduce each).
COLUMN_PARALLEL = ROW_STACKED
ROW_PARALLEL = COLUMN_SUMMED
IMPLEMENTATIONS = ("dtensor", "local")
DEFAULT_IMPL = "local"  # measured faster (module docstring)


@dataclass(frozen=True)
class TPOptions:
    """Tensor parallelism for one run: `enabled` under torchrun, collective `timeout_s`, implementation `impl`."""

    group_title = "tensor parallelism (launch with torchrun --nproc_per_node=N -m truedepth ...)"
    enabled: bool = option(
        False,
        "shard every layer (wide or not) over the N torchrun processes: column-parallel "
        "q/k/v/gate/up, row-parallel o/down, 2 all-reduces per layer. NCCL on GPUs, gloo on CPU; "
        "only rank 0 prints results.",
        flag="--tp",
    )
    timeout_s: float = option(
        DEFAULT_TIMEOUT_S,
        "a collective that waits longer than this (a rank died or hangs) "
        "stops every rank with an error instead of hanging.",
        flag="--tp-timeout",
        metavar="SECONDS",
    )
    impl: str = option(
        DEFAULT_IMPL,
        "dtensor: PyTorch's tensor-parallel API (parallelize_module); local: plain "
        "sharded weights and one torch.distributed.all_reduce per row-parallel layer, the same "
        "collectives with less per-op overhead in eager mode.",
        flag="--tp-impl",
        choices=IMPLEMENTATIONS,
    )


# ---------------------------------------------------------------------------------------------
# Up-front validation
# ---------------------------------------------------------------------------------------------
def shapes_from_config(config: Any, plan: Any = None) -> list[LayerWidths]:
    """Layer widths of `config` after `plan`, without building or loading the model."""
    if plan is not None and not as_plan(plan).is_identity and transformed_record(config) is not None:
        raise TPError(
            f"this model was already transformed with plan '{current_plan(config)}'; plans refer "
            "to the original layers: load the original model and apply one combined plan."
        )
    return layer_widths(config, plan)


def shapes_from_model(model: nn.Module) -> list[LayerWidths]:
    """Layer widths read from the modules themselves (the source of truth after a transform)."""
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [
            n
            for n in COLUMN_PARALLEL + ROW_PARALLEL
            if not isinstance(getattr(getattr(layer, n.split(".")[0], None), n.split(".")[1], None), nn.Linear)
        ]
        if missing or attn is None or mlp is None:
            raise TPError(
                f"layer {i} ({type(layer).__name__}) lacks the linear layers {', '.join(missing)}; --tp "
                "supports Llama-style layers (llama, mistral, qwen2, qwen3)."
            )
    return measured_widths(model)


def valid_world_sizes(shapes: list[LayerWidths]) -> list[int]:
    """World sizes that split every layer's heads, KV heads and MLP neurons evenly."""
    g = 0
    for s in shapes:
        g = math.gcd(g, math.gcd(s.heads, math.gcd(s.kv_heads, s.intermediate)))
    return [d for d in range(1, g + 1) if g % d == 0]


def check_world_size(shapes: list[LayerWidths], world_size: int) -> None:
    """Raise TPError naming the first layer that `world_size` ranks cannot split, and the valid sizes."""
    if not isinstance(world_size, int) or world_size < 1:
        raise TPError(f"the world size must be a positive integer (got {world_size!r}).")
    bad = [s for s in shapes if any(v % world_size for v in s.sizes().values())]
    if not bad:
        return
    first = bad[0]
    why = ", ".join(f"{name} {v}" for name, v in first.sizes().items() if v % world_size)
    more = f" ({len(bad) - 1} more layer{'s' if len(bad) > 2 else ''} too)" if len(bad) > 1 else ""
    valid = valid_world_sizes(shapes)
    lower = max(d for d in valid if d <= world_size)
    higher = [d for d in valid if d > world_size]
    raise TPError(
        f"--tp over {world_size} ranks cannot split {first.describe()}: not divisible by {world_size}: {why}{more}. "
        f"Valid world sizes for this model and plan: {', '.join(map(str, valid))}. Launch with torchrun "
        f"--nproc_per_node={lower}" + (f" (or {higher[0]})" if higher else "") + "."
    )


def validate_tp(model_or_config: Any, world_size: int, plan: Any = None) -> list[LayerWidths]:
    """Check, before any weight moves, that `world_size` ranks can shard every (wide) layer.

    Accepts a loaded (possibly transformed) model, or a config plus the plan to be applied."""
    if isinstance(model_or_config, nn.Module):
        if plan is not None:
            raise TPError("pass `plan` only with a config; a model's layers already show its plan.")
        shapes = shapes_from_model(model_or_config)
    else:
        shapes = shapes_from_config(model_or_config, plan)
    check_world_size(shapes, world_size)
    return shapes


def check_config(model: Any, plan: Any, world_size: int) -> list[LayerWidths]:
    """Validate `model` (name or folder) + `plan` for `world_size` ranks from its config alone."""
    from transformers import AutoConfig

    from ...core import hf  # noqa: F401  registers truedepth_<arch> configs
    from ...core.loading import resolve

    config = AutoConfig.from_pretrained(resolve(model), trust_remote_code=False)
    return validate_tp(config, world_size, plan)


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------
def layer_tp_plan() -> dict[str, Any]:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # Colwise outputs and Rowwise inputs stay local tensors (use_local_output), so the attention
    # code between them sees ordinary tensors with this rank's heads; its reshapes use -1 heads and
    # the q/kv head ratio it reads from the config is the same on every rank.
    return {
        **{name: ColwiseParallel() for name in COLUMN_PARALLEL},
        **{name: RowwiseParallel() for name in ROW_PARALLEL},
    }


def _shard_head_norms(layer: nn.Module, rank_index: int, world: int) -> None:
    """Wide Qwen3 layers carry one q/k norm weight row per head: keep this rank's heads' rows."""
    for name in HEAD_NORMS:
        norm = getattr(layer.self_attn, name, None)
        if norm is not None and norm.weight.ndim == 2:
            rows = norm.weight.detach().chunk(world, 0)[rank_index].clone()
            norm.weight = nn.Parameter(rows, requires_grad=norm.weight.requires_grad)


def _move_plain_tensors(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer that is not a DTensor (already placed) to `device`.

    A memo keeps shared parameters shared (tied embeddings and LM head stay one tensor)."""
    from torch.distributed.tensor import DTensor

    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or isinstance(p, DTensor) or p.device == device:
                continue
            if id(p) not in moved:
                moved[id(p)] = nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
            module._parameters[name] = moved[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)


def parallelize_tp(model: nn.Module, mesh_or_world: Any = None, impl: str = DEFAULT_IMPL) -> nn.Module:
    """Shard every decoder layer of `model` (wide or not) over a 1-D mesh, in place; returns `model`.

    `mesh_or_world`: a DeviceMesh, or None/an int world size to use the joined process group.
    `impl`: "dtensor" (PyTorch's `parallelize_module`) or "local" (`shard_locally`). All ranks
    must hold the same weights (dtensor scatters rank 0's). Validation runs before any weight
    moves. Parameters outside the layers are moved to the mesh's device whole."""
    if impl not in IMPLEMENTATIONS:
        raise TPError(f"unknown TP implementation {impl!r}; use one of {', '.join(IMPLEMENTATIONS)}.")
    mesh = _as_mesh(mesh_or_world)
    world = mesh.size()
    validate_tp(model, world)
    device = (
        torch.device(mesh.device_type, torch.cuda.current_device())
        if mesh.device_type == "cuda"
        else torch.device("cpu")
    )
    for layer in decoder_layers(model):
        if impl == "dtensor":
            from torch.distributed.tensor.parallel import parallelize_module

            parallelize_module(layer, mesh, layer_tp_plan(), src_data_rank=0)
        else:
            shard_locally(layer, mesh)
        _shard_head_norms(layer, mesh.get_local_rank(), world)
    _move_plain_tensors(model, device)
    model._truedepth_tp = {"world_size": world, "impl": impl}  # noqa: SLF001  marks the model as sharded
    return model


def _as_mesh(mesh_or_world: Any) -> Any:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if isinstance(mesh_or_world, DeviceMesh):
        mesh = mesh_or_world
    else:
        if not dist.is_initialized():
            raise TPError(
                "no process group: call truedepth.runtime.distributed.tp.init_distributed() under torchrun first."
            )
        world = dist.get_world_size() if mesh_or_world is None else int(mesh_or_world)
        if world != dist.get_world_size():
            raise TPError(f"asked for {world} ranks but the process group has {dist.get_world_size()}.")
        mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (world,))
    if mesh.ndim != 1:
        raise TPError(f"tensor parallelism needs a 1-D device mesh (got {mesh.ndim}-D).")
    return mesh


# ---------------------------------------------------------------------------------------------
# Hand-written alternative (impl="local"): measured faster than DTensor in eager decode (docs/
# MULTI_GPU.md), because each linear layer is a plain nn.Linear again and only the two
# all-reduces per layer go through torch.distributed. Same layout, same collectives. Inference only.
# ---------------------------------------------------------------------------------------------
def shard_locally(layer: nn.Module, mesh: Any) -> None:
    """Keep this rank's rows of q/k/v/gate/up and columns of o/down; all-reduce o/down outputs."""
    import torch.distributed as dist

    rank_index, world, group = mesh.get_local_rank(), mesh.size(), mesh.get_group()
    device = (
        torch.device(mesh.device_type, torch.cuda.current_device())
        if mesh.device_type == "cuda"
        else torch.device("cpu")
    )

    def keep(t: torch.Tensor, dim: int) -> nn.Parameter:
        # clone: the slice must not keep the full tensor's storage alive
        return nn.Parameter(t.detach().chunk(world, dim)[rank_index].to(device).clone(), requires_grad=False)

    for name in COLUMN_PARALLEL:
        linear = layer.get_submodule(name)
        linear.weight = keep(linear.weight, 0)
        if linear.bias is not None:
            linear.bias = keep(linear.bias, 0)
        linear.out_features //= world
    for name in ROW_PARALLEL:
        linear = layer.get_submodule(name)
        linear.weight = keep(linear.weight, 1)
        if linear.bias is not None and rank_index != 0:
            linear.bias = None  # added once, by rank 0, before the sum
        linear.in_features //= world
        linear.register_forward_hook(lambda module, inputs, out: dist.all_reduce(out, group=group))


def tp_info(model: nn.Module) -> dict[str, Any]:
    """{"world_size": N, "impl": ...} of a sharded model; world size 1 if it is not sharded."""
    return dict(getattr(model, "_truedepth_tp", {"world_size": 1, "impl": None}))


# ---------------------------------------------------------------------------------------------
# What commands call
# ---------------------------------------------------------------------------------------------
def maybe_shard(model: nn.Module, tp: TPOptions | None, device: Any = None) -> nn.Module:
    """Shard an already loaded (and transformed) model if `tp.enabled`; otherwise return it unchanged.

    Validates first, then joins the process group, silences stdout on ranks > 0, shards, and gives
    every rank the same random seed. Load the model on the CPU (`--device` is ignored for loading
    under --tp): a model already on cuda was put on every rank's current GPU before the ranks
    chose theirs. `load_model` does all of this and needs less memory."""
    if tp is None or not tp.enabled:
        return model
    validate_tp(model, env_world_size())
    mesh = init_distributed(tp.timeout_s, device)
    quiet_other_ranks()
    parallelize_tp(model, mesh, tp.impl)
    sync_seed()
    return model


def load_model(
    model: Any, plan: Any = None, dtype: Any = None, device: Any = None, tp: TPOptions | None = None
) -> tuple[nn.Module, Any]:
    """`loading.load_for_device`, made TP-aware: with `tp.enabled`, the model + plan are checked against
    the world size from the config alone (no weight read), loaded on the host, transformed, and
    each rank's shard moved to its own device (never the whole model onto one GPU)."""
    from ...core import loading
    from ...utils.device import default_dtype

    if tp is None or not tp.enabled:
        return loading.load_for_device(model, plan=plan, dtype=dtype, device=device)
    world = env_world_size()
    check_config(model, plan, world)
    mesh = init_distributed(tp.timeout_s, device)
    quiet_other_ranks()
    loaded, tokenizer = loading.load(model, dtype=dtype or default_dtype(mesh.device_type), device=None, plan=plan)
    parallelize_tp(loaded, mesh, tp.impl)
    sync_seed()
    return loaded, tokenizer


# ---------------------------------------------------------------------------------------------
# Counting collectives
# ---------------------------------------------------------------------------------------------
class AllReduceCounter:
    """Counts all-reduces issued inside a `with` block (DTensor's functional collectives and plain
    `torch.distributed.all_reduce` alike), using PyTorch's `CommDebugMode`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    @property
    def all_reduces(self) -> int:
        return sum(n for op, n in self.counts.items() if "all_reduce" in op or "allreduce" in op)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> AllReduceCounter:
        from torch.distributed.tensor.debug import CommDebugMode

        self._mode = CommDebugMode()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        # its module tracker hooks every module for backward and warns about HF output classes
        warnings.filterwarnings("ignore", message="For backward hooks to be called")
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._mode.__exit__(*exc)
            self.counts = {str(op): int(n) for op, n in self._mode.get_comm_counts().items()}
        finally:
            self._warnings.__exit__(*exc)


def expected_all_reduces(num_layers: int) -> int:
    """All-reduces per forward pass with every layer sharded: 2 per (possibly wide) layer."""
    return 2 * num_layers
