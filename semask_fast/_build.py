"""Just-in-time builds of the C++/CUDA sources in ``csrc/`` (installed as ``semask_fast.csrc``).

Every ``csrc/ops/<name>.cu`` is built on its own, in two flavours (and two more as tools):

* ``"simt"``: g++ compiles the ``.cu`` as C++ with ``-DSF_SIMT``, so its kernels run on CPU
  tensors in the SIMT harness (``csrc/harness/sf_simt.h``); ops appear as
  ``torch.ops.semask_fast_simt.<op>_forward`` / ``_backward``.
* ``"cuda"``: nvcc, machine code for sm_80 and sm_90 and PTX for compute_90 (which the driver
  compiles for newer GPUs); ops appear as ``torch.ops.semask_fast_cuda.*``.
* ``"trace"``: the simt build with every load and store instrumented
  (``csrc/harness/sf_trace.h``), which counts the kernels' global-memory traffic; ops appear as
  ``torch.ops.semask_fast_trace_<name>.*`` beside ``trace_begin`` / ``trace_end``.  Used by
  ``benchmarks/traffic_cuda.py``, never by a backend.
* ``"asan"``: the simt build under AddressSanitizer and UndefinedBehaviorSanitizer with alignment
  checks (:data:`ASAN_CFLAGS`); the harness marks the unused tail of dynamic shared memory and
  tells ASan which fiber stack runs (``csrc/harness/sf_simt.h``).  Any finding aborts the process
  with the sanitizer's report.  Its ops are the simt namespace's: a process started with
  :func:`asan_environment` (the ASan runtime preloaded, ``SEMASK_FAST_SIMT_BUILD=asan``) runs the
  ``simt`` backend on this build instead (:func:`simt_flavour`), so the two never load together.
  A correctness tool like simt, never chosen on its own; ``tests/harness/test_asan.py`` uses it.

The native CPU kernels, ``csrc/cpu/<name>.cpp``, are another flavour:

* ``"cpu"``: g++ with OpenMP (``at::parallel_for``) for the instruction set of the machine it runs
  on (``-march=native``; ``SEMASK_FAST_CPU_ISA=portable`` builds for the compiler's baseline
  instead, e.g. plain x86-64 SSE2); ops appear as ``torch.ops.semask_fast_cpu.*``.  The CPU's
  feature flags are part of the build hash: a cache shared by machines of different CPUs never
  hands one a library built for the other.

One shared library per (flavour, source file): a file that does not compile only takes its own
ops down, and editing one kernel rebuilds one library.  A source whose op declares its template
instances (:class:`Instances`, ``INSTANCES`` in ``semask_fast/backends/cuda/<name>.py``) is
compiled as several translation units linked into that one library, in parallel (ninja,
``$MAX_JOBS``): one generated unit per (dtype, tile) explicitly instantiating that case's
launchers, and the source itself for the bindings, which declares them extern; a generated header
(``sf_<name>_instances.h``, an X-macro list) is what the source's dispatch and size limit are
written from, so the limit has one owner (:func:`generated_files`).  The generated files live in
the build directory.  Builds go through
``torch.utils.cpp_extension.load`` (ninja) into a directory named after a hash of everything
that affects the binary (the source, every header of its language (``csrc/cpu``, or ``csrc/include``
and ``csrc/harness``) and of both (``csrc/common``), the generated units and header, flags, torch
version), under ``$SEMASK_FAST_BUILD_DIR`` or
``~/.cache/semask_fast``, so a build is reused across processes and CI runs until an input changes.

Nothing here runs at import time: a pure install never compiles.  ``SEMASK_FAST_BUILD_CUDA=1``
makes setup.py build the cuda flavour ahead of time into ``semask_fast/_prebuilt`` (used while
its hash matches, see :func:`prebuilt_module`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from unittest import mock

FLAVOURS = ("simt", "cuda", "trace", "cpu", "asan")

#: torch.ops namespace of each flavour (SF_TORCH_NS in csrc/include/sf_torch.h); the trace
#: flavour has one per source (several traced libraries can be loaded at once).
NAMESPACES = {"simt": "semask_fast_simt", "cuda": "semask_fast_cuda", "cpu": "semask_fast_cpu",
              "asan": "semask_fast_simt"}


def namespace(flavour: str, source: Path) -> str:
    if flavour == "trace":
        return "semask_fast_trace_" + re.sub(r"\W", "_", source.stem)
    return NAMESPACES[flavour]

#: GPU architectures of the cuda flavour: machine code (SASS) for each.
CUDA_ARCHS = ("80", "90")
#: PTX is embedded for the newest one: the driver compiles it for GPUs newer than every SASS target
#: (sm_100, sm_120...), which would otherwise fail at launch with "no kernel image".  None: no PTX,
#: and such GPUs are declared unsupported (see :func:`cuda_arch_reasons`).
CUDA_PTX_ARCH: Optional[str] = CUDA_ARCHS[-1]

# torch compiles every nvcc source with these (cpp_extension.COMMON_NVCC_FLAGS); the harness build
# uses them too, so a kernel that compiles under the harness compiles under nvcc.
_HALF_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
SIMT_CFLAGS = ["-O2", "-std=c++20", "-DSF_SIMT", "-fno-strict-aliasing", "-Wno-unused-function"] + _HALF_FLAGS
#: g++ instruments every load and store with a call: ThreadSanitizer's instrumentation, without its
#: runtime (csrc/harness/sf_trace.h defines the callbacks).  Unlike AddressSanitizer's, it keeps the
#: store of a read-modify-write (ASan drops a check dominated by one of the same address).
TRACE_CFLAGS = SIMT_CFLAGS + ["-DSF_TRACE", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]
#: AddressSanitizer (out-of-bounds and use-after-free on the heap: tensors, dynamic shared memory,
#: fiber stacks) and UndefinedBehaviorSanitizer with alignment checks (a vector load through a
#: misaligned pointer, overflowing signed arithmetic, out-of-bounds indexing of a sized array such
#: as a static shared one); -fno-sanitize-recover: the first finding aborts, so it cannot pass
#: unnoticed.  -g1: line numbers in the reports.
ASAN_SANITIZERS = "-fsanitize=address,undefined,alignment"
ASAN_CFLAGS = SIMT_CFLAGS + [ASAN_SANITIZERS, "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]
#: g++ flags of the flavours compiled as C++ (the harness).
HOST_CFLAGS = {"simt": SIMT_CFLAGS, "trace": TRACE_CFLAGS, "asan": ASAN_CFLAGS}
#: g++ flags of the native CPU kernels (the instruction set is added by :func:`cpu_isa_flags`).  No
#: -ffast-math: the kernels' exp is their own, and NaN/inf must propagate as in PyTorch.
#: -fno-tree-loop-distribute-patterns: a row copy stays a vector loop, not a memcpy call per row.
CPU_CFLAGS = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno",
              "-fno-tree-loop-distribute-patterns", "-Wno-unused-function"]
CPU_ISAS = ("native", "portable")
CUDA_CFLAGS = (["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
               + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
               + ([f"-gencode=arch=compute_{CUDA_PTX_ARCH},code=compute_{CUDA_PTX_ARCH}"] if CUDA_PTX_ARCH else []))


def _arch(name: str) -> Tuple[int, int]:
    return int(name[:-1]), int(name[-1])


def cuda_arch_reasons(capability: Tuple[int, int]) -> List[str]:
    """Why the cuda flavour's kernels cannot run on a GPU of this compute capability ([] = they can).

    SASS built for sm_XY runs on sm_XZ with Z >= Y (same major version); the embedded PTX of
    :data:`CUDA_PTX_ARCH` is compiled by the driver for any newer GPU.
    """
    sass = [_arch(a) for a in CUDA_ARCHS]
    if any(capability[0] == major and capability[1] >= minor for major, minor in sass):
        return []
    if CUDA_PTX_ARCH and capability >= _arch(CUDA_PTX_ARCH):
        return []
    built = ", ".join(f"sm_{a}" for a in CUDA_ARCHS)
    ptx = f" and PTX for compute_{CUDA_PTX_ARCH}" if CUDA_PTX_ARCH else ", no PTX"
    return [f"compute capability {capability[0]}.{capability[1]}: the kernels are built as machine code for "
            f"{built}{ptx}, none of which this GPU runs"]


class BuildError(RuntimeError):
    """A source failed to compile; ``first_error`` is the compiler's first error line."""

    def __init__(self, flavour: str, source: str, log: str):
        self.flavour, self.source, self.log = flavour, source, log
        self.first_error = first_error_line(log)
        super().__init__(f"{flavour} build of {source} failed: {self.first_error}")


def first_error_line(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE) and "Error building extension" not in line:
            return line.strip()
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    return lines[-1] if lines else "unknown error"


def csrc_dir() -> Path:
    spec = importlib.util.find_spec("semask_fast.csrc")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("semask_fast.csrc is not installed (the C++/CUDA sources are missing)")
    return Path(list(spec.submodule_search_locations)[0])


def op_sources() -> List[Path]:
    """Every kernel source file, ``csrc/ops/*.cu``."""
    return sorted((csrc_dir() / "ops").glob("*.cu"))


def source_path(name: str) -> Path:
    """``name`` is a file of ``csrc/ops`` (``"window_process.cu"``) or a path relative to ``csrc``."""
    base = csrc_dir()
    path = base / name if "/" in name else base / "ops" / name
    if not path.is_file():
        raise FileNotFoundError(f"no C++/CUDA source {path}")
    return path


def cuda_home() -> Optional[Path]:
    """The CUDA toolkit: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the toolkit of nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(os.path.realpath(nvcc)).parent.parent))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return Path(c)
    return None


def cpu_isa() -> str:
    """Instruction set of the cpu flavour: ``$SEMASK_FAST_CPU_ISA`` (native or portable), default native."""
    isa = os.environ.get("SEMASK_FAST_CPU_ISA", "native")
    if isa not in CPU_ISAS:
        raise ValueError(f"SEMASK_FAST_CPU_ISA={isa!r} (expected one of {CPU_ISAS})")
    return isa


def cpu_isa_flags() -> List[str]:
    return ["-march=native"] if cpu_isa() == "native" else []


def cpu_features() -> str:
    """This CPU's model and feature flags (Linux /proc/cpuinfo; elsewhere the platform's name)."""
    import platform

    model = flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and not model:
                    model = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features") and not flags:
                    flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model or platform.processor()}|{flags or platform.machine()}"


def _flags(flavour: str) -> List[str]:
    if flavour == "cpu":
        return CPU_CFLAGS + cpu_isa_flags()
    return HOST_CFLAGS.get(flavour, CUDA_CFLAGS)


def simt_flavour() -> str:
    """The build the ``simt`` backend runs: ``$SEMASK_FAST_SIMT_BUILD``, ``simt`` (default) or ``asan``
    (in a process started with :func:`asan_environment`)."""
    flavour = os.environ.get("SEMASK_FAST_SIMT_BUILD") or "simt"
    if flavour not in ("simt", "asan"):
        raise ValueError(f"SEMASK_FAST_SIMT_BUILD={flavour!r} (expected simt or asan)")
    return flavour


def _resolve(flavour: str) -> str:
    return simt_flavour() if flavour == "simt" else flavour


def asan_runtime() -> Optional[Path]:
    """The compiler's AddressSanitizer runtime (libasan), which a process must preload before it
    can load an asan build (Python is not linked with it); None if the compiler has none."""
    out = _compiler_output("-print-file-name=libasan.so")
    return Path(out) if out and os.path.isabs(out) and os.path.isfile(out) else None


def _compiler_output(*args: str) -> str:
    import subprocess

    try:
        return subprocess.run([os.environ.get("CXX", "g++"), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def asan_runtime_loaded() -> bool:
    """Whether this process runs with the AddressSanitizer runtime (preloaded)."""
    import ctypes

    return hasattr(ctypes.CDLL(None), "__asan_init")


#: Sanitizer settings of an asan process: Python frees nothing at exit (leak reports would be
#: noise); a finding exits with status 1 after its report, with a stack trace for UBSan too.
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=1"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


def asan_environment(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of a process whose ``simt`` backend runs the asan build: ``base`` (default
    ``os.environ``) with the ASan runtime preloaded, the sanitizers' options and
    ``SEMASK_FAST_SIMT_BUILD=asan``."""
    runtime = asan_runtime()
    if runtime is None:
        raise RuntimeError("; ".join(toolchain_reasons("asan")))
    env = dict(os.environ if base is None else base)
    # libstdc++ right after it: ASan finds the __cxa_throw it wraps only in libraries loaded at its
    # start, and Python does not link libstdc++ (the first C++ exception would abort the process).
    stdcpp = _compiler_output("-print-file-name=libstdc++.so.6")
    env["LD_PRELOAD"] = " ".join(filter(None, [str(runtime), stdcpp, env.get("LD_PRELOAD", "")]))
    env["ASAN_OPTIONS"] = ":".join(filter(None, [ASAN_OPTIONS, env.get("ASAN_OPTIONS", "")]))
    env["UBSAN_OPTIONS"] = ":".join(filter(None, [UBSAN_OPTIONS, env.get("UBSAN_OPTIONS", "")]))
    env["SEMASK_FAST_SIMT_BUILD"] = "asan"
    return env


def toolchain_reasons(flavour: str) -> List[str]:
    """Why ``flavour`` (``simt``: the build the simt backend runs, :func:`simt_flavour`) cannot be
    built on this machine ([] = it can)."""
    flavour = _resolve(flavour)
    reasons = []
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        reasons.append("ninja is not installed (pip install ninja)")
    home = cuda_home()
    if flavour == "cpu":
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            reasons.append("no C++ compiler (g++ or $CXX) for the native CPU kernels")
    elif flavour in HOST_CFLAGS:
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            reasons.append("no C++ compiler (g++ or $CXX) for the SIMT harness build")
        if home is None:
            reasons.append("CUDA headers (cuda_fp16.h) not found: set CUDA_HOME to a CUDA toolkit")
        if flavour == "asan" and asan_runtime() is None:
            reasons.append("the C++ compiler has no AddressSanitizer runtime (libasan)")
    elif flavour == "cuda":
        if home is None or not (home / "bin" / "nvcc").is_file():
            reasons.append("nvcc not found: set CUDA_HOME to a CUDA toolkit")
    else:
        raise ValueError(f"unknown flavour {flavour!r} (expected one of {FLAVOURS})")
    return reasons


def _cpp_extension():
    """torch.utils.cpp_extension, pointed at the toolkit :func:`cuda_home` found."""
    home = cuda_home()
    if home is not None and "torch.utils.cpp_extension" not in __import__("sys").modules:
        # cpp_extension fixes CUDA_HOME at import; a wrapper script named nvcc on PATH (as on
        # some machines) would otherwise make it guess a directory without the headers.
        os.environ.setdefault("CUDA_HOME", str(home))
    from torch.utils import cpp_extension

    return cpp_extension


#: C++ element type and ATen scalar type of each dtype an op can be instantiated for.
DTYPES = {"float32": ("float", "at::kFloat"), "float16": ("__half", "at::kHalf"),
          "bfloat16": ("__nv_bfloat16", "at::kBFloat16")}


@dataclasses.dataclass(frozen=True)
class Instances:
    """The template instances of a ``csrc/ops`` source, declared by its op's CUDA backend module
    (``INSTANCES``): one per (dtype, tile), ``tiles`` ascending, a size padded to the smallest tile
    that holds it.  The build compiles one unit per instance and generates the X-macro list the
    source's dispatch and limit check are written from (:func:`generated_files`); the backend
    derives its reasons from :attr:`limit`.  ``name`` names the padded size (``head_dim``,
    ``classes``): the source's limit is ``SF_<SOURCE>_MAX_<NAME>``."""

    name: str
    tiles: Tuple[int, ...]
    dtypes: Tuple[str, ...] = tuple(DTYPES)

    def __post_init__(self):
        if not self.tiles or list(self.tiles) != sorted(set(self.tiles)) or self.tiles[0] < 1:
            raise ValueError(f"tiles must be distinct, ascending and positive, got {self.tiles}")
        unknown = set(self.dtypes) - set(DTYPES)
        if unknown or not self.dtypes:
            raise ValueError(f"dtypes must be among {tuple(DTYPES)}, got {self.dtypes}")

    @property
    def limit(self) -> int:
        """The largest size served: the largest tile."""
        return self.tiles[-1]


def instances(source: Path) -> Optional[Instances]:
    """The instances the op of ``csrc/ops/<name>.cu`` declares (``INSTANCES`` of
    ``semask_fast.backends.cuda.<name>``); None: the source is one translation unit."""
    if source.parent.name != "ops":
        return None
    module = f"{__package__ or 'semask_fast'}.backends.cuda.{source.stem}"
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except ModuleNotFoundError:
        return None
    return getattr(importlib.import_module(module), "INSTANCES", None)


def _macro(source: Path) -> str:
    return "SF_" + re.sub(r"\W", "_", source.stem).upper()


def generated_files(source: Path, declared: Optional[Instances] = None) -> Dict[str, str]:
    """File name -> text of what the build generates for ``source`` (``declared``: its
    :func:`instances`), independent of where the files go (it enters the build hash):

    * ``sf_<name>_instances.h``: ``SF_<NAME>_INSTANCES(X)``, an X-macro list ``X(T, scalar type,
      TILE)`` of every instance, tiles ascending per dtype (the source's dispatch and its extern
      launcher declarations), and ``SF_<NAME>_MAX_<SIZE>``, the limit;
    * ``<name>__<dtype>_<tile>.cu`` per instance: includes the source (``SF_INSTANCE_UNIT``: its
      launchers, not its bindings) and expands ``SF_LAUNCHERS(, T, TILE)``, the source's explicit
      instantiations of that case's launchers.

    Empty for a source without instances."""
    declared = declared if declared is not None else instances(source)
    if declared is None:
        return {}
    macro, origin = _macro(source), f"semask_fast/backends/cuda/{source.stem}.py (INSTANCES)"
    cases = [(dtype, tile) for dtype in declared.dtypes for tile in declared.tiles]
    lines = [f"// Generated by semask_fast/_build.py from {origin}: do not edit.",
             "#pragma once", "",
             f"// X(T, scalar type, {declared.name} tile) per compiled instance, tiles ascending per dtype.",
             f"#define {macro}_INSTANCES(X) \\"]
    lines += [f"  X({DTYPES[d][0]}, {DTYPES[d][1]}, {t}) \\" for d, t in cases]
    lines += ["", f"// The largest {declared.name} served (the largest tile).",
              f"#define {macro}_MAX_{declared.name.upper()} {declared.limit}", ""]
    files = {f"sf_{source.stem}_instances.h": "\n".join(lines)}
    for dtype, tile in cases:
        files[f"{source.stem}__{dtype}_{tile}.cu"] = (
            f"// Generated by semask_fast/_build.py from {origin}: the {dtype} {declared.name} {tile} launchers "
            f"of csrc/ops/{source.name}.\n"
            f'#define SF_INSTANCE_UNIT\n#include "ops/{source.name}"\n\nSF_LAUNCHERS(, {DTYPES[dtype][0]}, {tile})\n')
    return files


def write_generated(flavour: str, source: Path, directory: Path, declared: Optional[Instances] = None) -> List[Path]:
    """Writes :func:`generated_files` of ``source`` into ``directory`` (a file whose text is unchanged
    keeps its time stamp: ninja stays up to date) and returns the units to compile, ``.cu`` for nvcc,
    ``.cpp`` for the flavours compiled as C++ (the harness)."""
    units = []
    for name, text in generated_files(source, declared).items():
        if name.endswith(".cu"):
            name = name[:-3] + (".cu" if flavour == "cuda" else ".cpp")
            units.append(directory / name)
        path = directory / name
        if not path.is_file() or path.read_text() != text:
            directory.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return units


def _digest(flavour: str, source: Path, csrc: Optional[Path] = None) -> str:
    import torch

    csrc = csrc or csrc_dir()
    h = hashlib.sha256()
    h.update(f"{flavour}|{torch.__version__}|{_flags(flavour)}".encode())
    if flavour == "cpu":
        h.update(cpu_features().encode())
    # csrc/common: headers of both languages (included by relative path).
    header_dirs = ("cpu", "common") if flavour == "cpu" else ("include", "harness", "common")
    headers = [f for d in header_dirs for f in sorted((csrc / d).iterdir()) if f.suffix in (".h", ".cuh")]
    files = [source] + headers
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    for name, text in sorted(generated_files(source).items()):
        h.update(name.encode())
        h.update(text.encode())
    return h.hexdigest()[:16]


def build_root() -> Path:
    return Path(os.environ.get("SEMASK_FAST_BUILD_DIR") or Path.home() / ".cache" / "semask_fast")


def library_path(flavour: str, name: str) -> Path:
    """Where the shared library of ``name`` (see :func:`source_path`) is (or will be) built."""
    source = source_path(name)
    stem = re.sub(r"\W", "_", source.stem)
    return build_root() / f"{flavour}-{stem}-{_digest(flavour, source)}" / f"sf_{flavour}_{stem}.so"


#: Where ``SEMASK_FAST_BUILD_CUDA=1 pip install .`` puts the ahead-of-time nvcc builds.
PREBUILT_DIR = Path(__file__).resolve().parent / "_prebuilt"


def prebuilt_module(source: Path, csrc: Optional[Path] = None) -> str:
    """Module name of the ahead-of-time cuda build of ``source`` (setup.py).

    The name carries the same hash as the JIT build directory, so a prebuilt library is used only
    while the sources, headers, flags and torch version it was built from are unchanged.
    """
    stem = re.sub(r"\W", "_", source.stem)
    return f"semask_fast._prebuilt.sf_cuda_{stem}_{_digest('cuda', source, csrc)}"


def _prebuilt_library(source: Path) -> Optional[Path]:
    name = prebuilt_module(source).rsplit(".", 1)[1]
    found = sorted(PREBUILT_DIR.glob(name + "*.so")) if PREBUILT_DIR.is_dir() else []
    return found[0] if found else None


_lock = threading.Lock()
_loaded: Dict[tuple, object] = {}
_files: Dict[tuple, Path] = {}


def load(flavour: str, name: str, verbose: bool = False):
    """Build (or reuse) and load ``name``; return the ``torch.ops`` namespace of ``flavour``
    (``simt``: of :func:`simt_flavour`).

    Raises :class:`BuildError` with the compiler's first error line; the failure is remembered
    for the process, so availability checks do not recompile.
    """
    flavour = _resolve(flavour)
    key = (flavour, name)
    with _lock:
        if key not in _loaded:
            try:
                _loaded[key] = _build_and_load(flavour, name, verbose)
            except BuildError as e:
                _loaded[key] = e
        result = _loaded[key]
    if isinstance(result, BuildError):
        raise result
    return result


def build(flavour: str, name: str, verbose: bool = False) -> Path:
    """Build ``name`` unless its library is built already (or prebuilt); return the library file,
    without loading it (an asan build loads only in a process started with :func:`asan_environment`)."""
    flavour = _resolve(flavour)
    reasons = toolchain_reasons(flavour)
    if reasons:
        raise BuildError(flavour, name, "error: " + "; ".join(reasons))
    source = source_path(name)
    prebuilt = _prebuilt_library(source) if flavour == "cuda" else None
    if prebuilt is not None:
        return prebuilt
    out = library_path(flavour, name)
    if not _done_marker(out).is_file():
        _compile(flavour, source, out, verbose)
        _done_marker(out).touch()
    return out


def _build_and_load(flavour: str, name: str, verbose: bool):
    import torch

    out = build(flavour, name, verbose)
    if flavour == "asan" and not asan_runtime_loaded():
        # Loading it anyway would make ASan end the process ("runtime does not come first").
        raise BuildError(flavour, name, "error: the AddressSanitizer runtime is not loaded in this process "
                                        "(start it with semask_fast._build.asan_environment())")
    torch.ops.load_library(str(out))
    _files[(flavour, name)] = out
    return getattr(torch.ops, namespace(flavour, source_path(name)))


def loaded_library(flavour: str, name: str) -> Path:
    """The file :func:`load` loaded for ``name`` (the sources may have changed since, so this is
    not necessarily :func:`library_path` of the sources now)."""
    load(flavour, name)
    return _files[(_resolve(flavour), name)]


def _done_marker(library: Path) -> Path:
    # Written after a build completed: a library file alone may still be being linked by another
    # process (cpp_extension serialises concurrent builds of one directory with a lock file).
    return library.with_suffix(".done")


def _compile(flavour: str, source: Path, out: Path, verbose: bool) -> None:
    cpp_extension = _cpp_extension()
    build_dir = out.parent
    build_dir.mkdir(parents=True, exist_ok=True)
    includes = [str(csrc_dir() / "include")]
    home = cuda_home()
    # The generated units (one per instance) and header: compiled beside the source, linked into
    # its library; the units include the source as "ops/<name>.cu".
    units = [] if flavour == "cpu" else [str(u) for u in write_generated(flavour, source, build_dir / "units")]
    if units:
        includes += [str(build_dir / "units"), str(csrc_dir())]
    if flavour == "cpu":
        includes = [str(csrc_dir() / "cpu")]
        sources = [str(source)]
        kwargs = dict(extra_cflags=_flags(flavour), extra_ldflags=["-fopenmp"], with_cuda=False)
    elif flavour in HOST_CFLAGS:
        includes += [str(csrc_dir() / "harness"), str(home / "include")]
        # The .cu is compiled as C++: a wrapper translation unit includes it.
        wrapper = build_dir / f"{source.stem}_{flavour}.cpp"
        text = f'#include "{source}"\n'
        if not wrapper.is_file() or wrapper.read_text() != text:  # keep its mtime: ninja is up to date
            wrapper.write_text(text)
        flags = list(HOST_CFLAGS[flavour])
        if flavour == "trace":
            flags.append(f"-DSF_TRACE_NS={namespace(flavour, source)}")
        sources, kwargs = [str(wrapper)] + units, dict(extra_cflags=flags, with_cuda=False)
        if flavour == "asan":  # the library needs the sanitizers' runtimes
            kwargs["extra_ldflags"] = [ASAN_SANITIZERS]
    else:
        sources = [str(source)] + units
        kwargs = dict(extra_cflags=["-O2", "-std=c++20"], extra_cuda_cflags=list(CUDA_CFLAGS), with_cuda=True)
    # cpp_extension.load also loads what it built; an asan library must not be loaded here (only
    # in a process with the ASan runtime preloaded), and :func:`load` loads every flavour itself.
    built_only = (mock.patch.object(cpp_extension, "_import_module_from_library", lambda *args: None)
                  if flavour == "asan" else contextlib.nullcontext())
    try:
        with built_only:
            cpp_extension.load(name=out.stem, sources=sources, extra_include_paths=includes,
                               build_directory=str(build_dir), is_python_module=False, verbose=verbose, **kwargs)
    except (RuntimeError, OSError) as e:
        raise BuildError(flavour, source.name, str(e)) from None
    if not out.is_file():
        raise BuildError(flavour, source.name, f"error: the build produced no {out.name}")
