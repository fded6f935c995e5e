"""GPU check of the core transform: exactness in fp32 and bf16, dynamic and static caches on CUDA.
(Compiled paths are exercised by scripts/gpu/bench.py.) It lives with the tests because it checks
against their independent reference (reference.py) on their tiny models (tiny.py); Python puts this
folder on sys.path when it runs as a script.

PYTHONPATH=src python tests/helpers/gpu_core.py --out DIR   (about 30 s on an H100/H200; scripts/gpu/run_all.sh runs it)
"""

import argparse
import json
from pathlib import Path

import torch
from reference import reference_logits
from tiny import ARCHS, tiny_model

import truedepth


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for arch in ARCHS:
        for dtype in (torch.float32, torch.bfloat16):
            m = tiny_model(
                arch,
                layers=8,
                hidden_size=256,
                intermediate_size=512,
                num_attention_heads=8,
                num_key_value_heads=4,
                head_dim=32,
            ).to(dev, dtype)
            m.config._attn_implementation = "sdpa"
            ids = torch.randint(3, 128, (2, 33), device=dev)
            want = reference_logits(m, "parallel=2:8/3", ids)
            truedepth.apply_plan(m, "parallel=2:8/3")
            with torch.no_grad():
                got = m(ids).logits
            kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            dyn = m.generate(ids, **kw)
            static = m.generate(ids, cache_implementation="static", **kw)
            rows.append(
                {
                    "arch": arch,
                    "dtype": str(dtype).split(".")[-1],
                    "rel_err_vs_reference": rel(got, want),
                    "static_equals_dynamic": bool(torch.equal(dyn, static)),
                }
            )
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "core.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                "torch": torch.__version__,
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
