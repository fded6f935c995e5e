"""The bandwidth bound of a decode step: the bytes it must read (weights, KV cache) against the device's
measured copy bandwidth, and the fraction of that bound a measured step reaches."""

from __future__ import annotations

from typing import Any

from ...utils.errors import MeasurementError


def weight_bytes_read(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the input embedding
    table, of which only one row per token is read (unless it is tied to the output head)."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params if tied or p is not embed)


def kv_bytes_per_token(model: Any) -> int:
    """KV-cache bytes one token adds (per sequence): K and V of every layer, wide layers included."""
    from ...core.arch import decoder_layers

    total = 0
    for layer in decoder_layers(model):
        attn = layer.self_attn
        for proj in (attn.k_proj, attn.v_proj):
            total += proj.out_features * proj.weight.element_size()
    return total


def bound_fraction(
    weight_bytes: int, kv_per_token: int, batch: int, context: float, step_s: float, bandwidth_gbs: float
) -> tuple[float, float]:
    """(fraction of the bandwidth bound, bound in tokens/s per sequence) for one decode step."""
    step_bytes = weight_bytes + kv_per_token * batch * context
    bound_step_s = step_bytes / (bandwidth_gbs * 1e9)
    return bound_step_s / step_s, 1.0 / bound_step_s


BOUND_TOLERANCE = 1.25  # the copy bandwidth is itself a measurement; beyond this a step time is wrong


def add_bound(record: dict[str, Any]) -> None:
    """The fraction of the bandwidth bound reached; a step faster than the bound allows is refused."""
    if not record.get("bandwidth_GBps") or "step_ms" not in record:
        return
    context = record["prompt"] + (record["new"] - 1) / 2  # mean cache length over the decode
    frac, bound = bound_fraction(
        record["weight_bytes"],
        record["kv_bytes_per_token"],
        record["batch"],
        context,
        record["step_ms"] / 1e3,
        record["bandwidth_GBps"],
    )
    if frac > BOUND_TOLERANCE:
        raise MeasurementError(
            f"{record['plan']} {record['mode']}: a decode step of {record['step_ms']:.4f} ms would read the weights "
            f"and KV cache {frac:.1f}x faster than the measured bandwidth ({record['bandwidth_GBps']:.0f} GB/s) "
            "allows, so the timing is wrong; raise --new and --repeats."
        )
    record["bound_fraction"], record["bound_tok_s"] = frac, bound
