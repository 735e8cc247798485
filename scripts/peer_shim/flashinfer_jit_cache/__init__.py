"""flashinfer's hook for a folder of prebuilt kernels (the `flashinfer-jit-cache` package), pointed at the
folder scripts/device_run.sh keeps (FERRY_FLASHINFER_AOT), so that mini-sglang, whose own flashinfer
install has an empty one, loads the kernels earlier device calls compiled instead of compiling them again
in every lease. Copied beside sgl_kernel into the peer's source folder for a device call; without the
variable the folder does not exist and flashinfer compiles as usual."""

from __future__ import annotations

import os
from importlib import metadata

try:
    __version__ = metadata.version("flashinfer-python")  # flashinfer refuses a cache of another version
except metadata.PackageNotFoundError:
    __version__ = "0"


def get_jit_cache_dir() -> str:
    return os.environ.get("FERRY_FLASHINFER_AOT", "/nonexistent/flashinfer-aot")
