"""GPU check of the core transform: exactness in fp32 and bf16, dynamic and static caches on CUDA.
(Compiled paths are exercised by scripts/gpu/bench.py.)

PYTHONPATH=src:tests python scripts/gpu/core.py --out DIR   (about 30 s on an H100/H200)
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import truedepth  # noqa: E402
from reference import reference_logits  # noqa: E402
from tiny import ARCHS, tiny_model  # noqa: E402


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
            m = tiny_model(arch, layers=8, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=32).to(dev, dtype)
            m.config._attn_implementation = "sdpa"
            ids = torch.randint(3, 128, (2, 33), device=dev)
            want = reference_logits(m, "parallel=2:8/3", ids)
            truedepth.apply_plan(m, "parallel=2:8/3")
            with torch.no_grad():
                got = m(ids).logits
            kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            dyn = m.generate(ids, **kw)
            static = m.generate(ids, cache_implementation="static", **kw)
            rows.append({"arch": arch, "dtype": str(dtype).split(".")[-1], "rel_err_vs_reference": rel(got, want),
                         "static_equals_dynamic": bool(torch.equal(dyn, static))})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "core.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                                               "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
