"""Build llama.cpp's programs from the llama.cpp that llama-cpp-python vendors, once per version.

    python -m truedepth.deploy.llamacpp.build        # or: make llama-programs

The llama-cpp-python source distribution of the installed version (pip download; or --sdist) carries
llama.cpp's whole tree under `vendor/llama.cpp`. Its programs (`programs.PROGRAMS`) are compiled from
there, so they are the same llama.cpp as the library the tests load: CPU only, Release, static
libraries (each program is self-contained), no HTTPS and no web UI for the server (nothing is
downloaded during the build). On x86_64 with `-mno-amx-int8`: GCC 12 miscompiles ggml's AMX-INT8
kernels, and the native build then segfaults decoding q8_0/q4 files on CPUs with AMX (docs/GGUF.md).

The result goes to `<cache>/llama.cpp/<version>/bin` (cache: `truedepth.utils.env.cache_dir`, the
user cache, outside any clone), renamed into place only when every program runs, so a second clone
(or a second `make test`) finds the programs and returns at once, and nothing half-made is ever
found. An interrupted build loses nothing: its work folder stays, and the next run goes on from it.
A lock makes a concurrent build wait for the first one instead of compiling twice. CMake comes from
PyPI (pip) when the machine has none.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ...utils.errors import UserError
from ...utils.options import add_options, from_args, option
from .programs import PROGRAMS, build_root, is_built, llama_cpp_version, programs_dir, version_dir

# Build settings (llama.cpp's CMake options, vendored in llama-cpp-python 0.3.36): what the
# module docstring promises. LLAMA_CURL no longer exists in this version (HTTPS is LLAMA_OPENSSL).
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the server's web UI is downloaded from Hugging Face
    "-DGGML_NATIVE=ON",
)
NO_AMX_FLAGS = ("-DCMAKE_C_FLAGS=-mno-amx-int8", "-DCMAKE_CXX_FLAGS=-mno-amx-int8")
VERSION_PATTERN = re.compile(r"^\d+(\.\d+)*([a-z0-9.+-]*)$")
PROGRESS = re.compile(r"^\[\s*\d+")  # ninja's [n/m] and make's [ nn%] lines: shown, the rest goes to the log


class BuildError(UserError):
    """The programs cannot be built here: the message says what is missing and where the log is."""


@dataclass
class BuildOptions:
    """Which llama.cpp to build, from where, and how."""

    version: str | None = option(
        None, "llama-cpp-python version whose vendored llama.cpp is built (default: the installed one).", metavar="V"
    )
    sdist: str | None = option(
        None, "a local llama_cpp_python-V.tar.gz to build from instead of pip download.", metavar="PATH"
    )
    jobs: int = option(2, "parallel compile jobs.")
    force: bool = option(False, "rebuild even if the programs of this version are in the cache.")


def cmake_arguments() -> list[str]:
    flags = list(NO_AMX_FLAGS) if platform.machine() in ("x86_64", "AMD64") else []
    return [*CMAKE_OPTIONS, *flags]


def check_options(opts: BuildOptions) -> str:
    """The version to build; every input checked before anything is downloaded or compiled."""
    version = opts.version or llama_cpp_version()
    if not VERSION_PATTERN.match(version):
        raise BuildError(f"--version {version!r} is not a version number; give one such as 0.3.36.")
    if not isinstance(opts.jobs, int) or opts.jobs < 1:
        raise BuildError(f"--jobs must be at least 1 (got {opts.jobs!r}).")
    if opts.sdist is not None:
        sdist = Path(opts.sdist).expanduser()
        if not sdist.is_file():
            raise BuildError(f"--sdist {opts.sdist}: no such file; give a llama_cpp_python-{version}.tar.gz.")
        if sdist.name != sdist_name(version):
            raise BuildError(
                f"--sdist {opts.sdist}: expected a file named {sdist_name(version)} for version {version}."
            )
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        raise BuildError("no C++ compiler found; install one (apt-get install g++) and rerun.")
    return version


def sdist_name(version: str) -> str:
    return f"llama_cpp_python-{version}.tar.gz"


def run_logged(argv: Sequence[str], log: Path, what: str, show_progress: bool = False) -> None:
    """Run `argv`, appending its output to `log` (progress lines also to stdout); a failure is a BuildError."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, argv))}\n")
        out.flush()
        process = subprocess.Popen(
            list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            if show_progress and PROGRESS.match(line):
                print(line.rstrip()[:160], flush=True)
        code = process.wait()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise BuildError(f"{what} failed (exit {code}); full log: {log}\n{tail}")


def download_sdist(version: str, folder: Path, log: Path) -> Path:
    """llama-cpp-python's source distribution by pip (the package is never installed by this)."""
    folder.mkdir(parents=True, exist_ok=True)
    print(f"downloading the llama-cpp-python {version} source distribution (pip download)", flush=True)
    run_logged(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            f"llama-cpp-python=={version}",
            "--dest",
            folder,
        ],
        log,
        f"pip download llama-cpp-python=={version}",
    )
    path = folder / sdist_name(version)
    if not path.is_file():
        raise BuildError(
            f"pip download gave no {sdist_name(version)} (found {sorted(p.name for p in folder.iterdir())})."
        )
    return path


def extract_llama_cpp(sdist: Path, version: str, folder: Path) -> Path:
    """Unpack only `vendor/llama.cpp` of the sdist into `folder`; the path of the llama.cpp tree."""
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{sdist} has no {prefix}: not a llama-cpp-python source distribution with llama.cpp.")
        tar.extractall(folder, members=members, filter="data")
    return folder / prefix


def cmake_program() -> str:
    """CMake: the machine's, else the one pip installs into this Python environment (PyPI's `cmake`)."""
    here = Path(sys.executable).parent / "cmake"
    found = shutil.which("cmake") or (str(here) if here.is_file() else None)
    if found:
        return found
    print("no cmake on this machine: installing it from PyPI into this Python environment (pip install cmake)")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake"], check=True)
    if not here.is_file():
        raise BuildError(f"pip install cmake did not put cmake at {here}; install CMake (apt-get install cmake).")
    return str(here)


@contextlib.contextmanager
def build_lock(version: str) -> Iterator[None]:
    """One build of a version at a time (a second one waits, then finds it built)."""
    root = build_root()
    with open(root / f".{version}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another build of llama.cpp {version} is running; waiting for it", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def smoke_test(folder: Path) -> None:
    """Each program starts and prints its usage or version: catches a binary this CPU cannot run (killed by
    a signal). llama-quantize has no --version and exits 1 after its usage; the others exit 0."""
    for name in PROGRAMS:
        flag = "--help" if name == "llama-quantize" else "--version"
        result = subprocess.run([folder / name, flag], capture_output=True, text=True, timeout=60)
        if result.returncode not in (0, 1) or not (result.stdout + result.stderr).strip():
            raise BuildError(
                f"the built {name} does not run ({name} {flag}: exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-300:]}"
            )


def unpacked_source(opts: BuildOptions, version: str, work: Path, log: Path) -> Path:
    """llama.cpp's tree in `work`, unpacked once: a resumed build finds it (the marker is written last)."""
    done = work / "source-unpacked"
    source = work / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if done.exists():
        return source
    shutil.rmtree(work / "src", ignore_errors=True)
    sdist = Path(opts.sdist).expanduser() if opts.sdist else download_sdist(version, work / "sdist", log)
    extract_llama_cpp(sdist, version, work / "src")
    shutil.rmtree(work / "sdist", ignore_errors=True)
    done.touch()
    return source


def build_programs(opts: BuildOptions | None = None) -> Path:
    """Build (or find already built) the programs; returns their folder.

    Compiling happens in `<root>/.<version>.work` (kept when a build is interrupted or fails, so the
    next run goes on where it stopped; removed after success); the programs then go to a temporary
    folder, are checked, and that folder is renamed to `<root>/<version>`."""
    opts = opts or BuildOptions()
    version = check_options(opts)
    target = version_dir(version)
    if is_built(version) and not opts.force:
        print(f"llama.cpp programs of llama-cpp-python {version} already built: {programs_dir(version)}")
        return programs_dir(version)
    root = build_root()
    work = root / f".{version}.work"
    with build_lock(version):
        if is_built(version) and not opts.force:  # built by the build we waited for
            return programs_dir(version)
        if opts.force:
            shutil.rmtree(work, ignore_errors=True)
        cmake = cmake_program()
        log = root / f"build-{version}.log"
        resumed = work.exists()
        work.mkdir(exist_ok=True)
        with open(log, "a" if resumed else "w") as out:
            out.write(f"\n# {'resumed' if resumed else 'started'} {datetime.datetime.now().isoformat()}\n")
        start = time.monotonic()
        source = unpacked_source(opts, version, work, log)
        build = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        print(f"configuring llama.cpp{' (resuming an earlier build)' if resumed else ''}; log: {log}", flush=True)
        run_logged([cmake, "-S", source, "-B", build, *generator, *cmake_arguments()], log, "cmake configure")
        print(f"compiling {', '.join(PROGRAMS)} with {opts.jobs} jobs", flush=True)
        run_logged(
            [cmake, "--build", build, "--config", "Release", "-j", str(opts.jobs), "--target", *PROGRAMS],
            log,
            "cmake build",
            show_progress=True,
        )
        seconds = time.monotonic() - start
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.building-", dir=root))  # same file system: rename
        try:
            out = staging / "out"
            (out / "bin").mkdir(parents=True)
            for name in PROGRAMS:
                shutil.copy2(build / "bin" / name, out / "bin" / name)
            smoke_test(out / "bin")
            info = {
                "llama_cpp_python": version,
                "programs": list(PROGRAMS),
                "cmake_arguments": cmake_arguments(),
                "jobs": opts.jobs,
                "build_seconds": round(seconds, 1),
                "resumed": resumed,
                "machine": platform.machine(),
                "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            (out / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
            if target.exists():  # --force: the old build moves aside and goes with the staging folder
                target.rename(staging / "old")
            out.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    print(f"built llama.cpp programs of llama-cpp-python {version} in {seconds / 60:.1f} min: {programs_dir(version)}")
    return programs_dir(version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m truedepth.deploy.llamacpp.build",
        description=__doc__.strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(parser, BuildOptions)
    opts = from_args(BuildOptions, parser.parse_args(argv))
    try:
        build_programs(opts)
    except UserError as e:
        print(f"llama.cpp build: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
