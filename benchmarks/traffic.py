"""Helpers of the traffic scripts: the counters (from :mod:`semask_fast._traffic`, where the tests
take them too), the GPU-tile switch and the results file.

* :func:`aten_bytes`: the inputs and outputs of every aten op a function runs (eager PyTorch);
* :func:`triton_bytes`: the bytes the Triton kernels touch, counted in Triton's interpreter;
* :func:`harness_bytes`: the bytes the CUDA C++ kernels touch, counted in the SIMT harness's
  ``trace`` build;
* :func:`minimum_bytes`: inputs read once, outputs written once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from semask_fast._traffic import Traffic, aten_bytes, harness_bytes, minimum_bytes, triton_bytes

__all__ = ["RESULTS", "Traffic", "aten_bytes", "gpu_tiles", "harness_bytes", "minimum_bytes", "triton_bytes",
           "write_section"]


def gpu_tiles() -> None:
    """Make the Triton launchers pick the tiles a GPU runs, not the interpreter's large test tiles,
    so the interpreter counts what a GPU would move."""
    import semask_fast.kernels as kernels

    kernels.INTERPRETER_TILES = False


#: The file every traffic script writes its section into.
RESULTS = Path(__file__).resolve().parent / "results" / "traffic.md"


def write_section(name: str, text: str, path: Optional[Path] = None) -> None:
    """Replace the ``<!-- name:begin -->`` ... ``<!-- name:end -->`` section of the results file
    (appending it if missing, creating the file if needed); other sections are left alone."""
    path = path or RESULTS
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Memory traffic\n")
    body = path.read_text()
    if begin in body and end in body:
        head, rest = body.split(begin, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = body.rstrip("\n") + "\n\n", "\n"
    path.write_text(f"{head}{begin}\n{text}{end}{tail}")
