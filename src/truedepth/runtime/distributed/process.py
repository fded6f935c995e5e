"""The torchrun process group: ranks, devices, joining with a timeout, seeds, and clear errors when a rank dies."""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch

from .errors import DEFAULT_TIMEOUT_S, RankFailureError, TPError


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------
def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE"))


def env_world_size() -> int:
    """World size announced by torchrun; a clear error when the command was not launched by it."""
    if not under_torchrun():
        raise TPError(
            "--tp needs one process per rank: launch with `torchrun --nproc_per_node=N -m truedepth "
            "COMMAND --tp ...` (N = number of GPUs, or CPU processes with gloo)."
        )
    return int(os.environ["WORLD_SIZE"])


def rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """True on rank 0 (and in a plain single process): the rank that prints results."""
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """`print` on rank 0 only."""
    if is_main():
        print(*args, **kwargs)


def quiet_other_ranks() -> None:
    """Send stdout of ranks other than 0 to /dev/null, so results are printed once.

    stderr stays open on every rank: an error on any rank must still be seen. Progress bars write
    to stderr; pass ``disable=not tp.is_main()`` to tqdm."""
    if not is_main():
        sys.stdout.flush()
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  lives until the process exits


def rank_device(device: Any = None) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when GPUs are used, else cpu."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    wanted = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cpu":
        return torch.device("cpu")
    if wanted != "cuda":
        raise TPError(
            f"--device {wanted} conflicts with --tp: every rank uses cuda:LOCAL_RANK. "
            "Pass --device cuda (or leave it out), or --device cpu for gloo on CPU."
        )
    if not torch.cuda.is_available():
        raise TPError("--device cuda was asked for, but no GPU is visible; use --device cpu (gloo).")
    if local >= torch.cuda.device_count():
        raise TPError(
            f"LOCAL_RANK {local} has no GPU: only {torch.cuda.device_count()} are visible. "
            f"Use torchrun --nproc_per_node={torch.cuda.device_count()} or fewer."
        )
    return torch.device("cuda", local)


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S, device: Any = None) -> Any:
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) and return a 1-D DeviceMesh.

    `timeout_s` bounds every collective: when a rank dies or hangs the others raise (gloo) or are
    torn down by the NCCL watchdog instead of waiting forever. Idempotent."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if timeout_s is None or timeout_s <= 0:
        raise TPError(f"--tp-timeout must be a positive number of seconds (got {timeout_s}).")
    world = env_world_size()
    dev = rank_device(device)
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(timeout_s))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", timeout=timeout, device_id=dev)
        else:
            dist.init_process_group("gloo", timeout=timeout)
        atexit.register(_shutdown)
    if dist.get_world_size() != world:
        raise TPError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE is {world}.")
    return init_device_mesh(dev.type, (world,))


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):  # a dead peer may make the teardown itself fail
            dist.destroy_process_group()


def sync_seed() -> int:
    """Give every rank rank 0's random seed, so sampling draws the same tokens everywhere."""
    import torch.distributed as dist

    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64)
    if dist.is_initialized():
        backend = dist.get_backend()
        t = seed.to(f"cuda:{torch.cuda.current_device()}") if backend == "nccl" else seed
        dist.broadcast(t, src=0)
        seed = t.cpu()
    torch.manual_seed(int(seed))
    return int(seed)


@contextlib.contextmanager
def explain_rank_failures(timeout_s: float | None = None) -> Iterator[None]:
    """Turn a collective that failed because another rank died or hung into a clear RuntimeError."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as e:
        text = str(e)
        if isinstance(e, dist.DistError) or any(
            w in text
            for w in ("Timed out", "timed out", "Connection closed", "Connection reset", "NCCL", "Gloo", "gloo")
        ):
            limit = f" within --tp-timeout {timeout_s:g} s" if timeout_s else ""
            raise RankFailureError(
                f"rank {rank()}: a collective failed{limit}: another rank died or stopped "
                f"responding ({text.splitlines()[0][:200]}). Check the other ranks' errors; "
                "raise --tp-timeout if a rank is only slow (e.g. loading a large model)."
            ) from e
        raise
