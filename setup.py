"""Builds evtchn's Cython extensions; metadata lives in pyproject.toml.

pip install -e . --no-build-isolation      # or: python setup.py build_ext --inplace
(without build isolation, first: pip install -U 'setuptools>=77' 'cython>=3' numpy)
EVTCHN_DEBUG_BUILD=1 pip install -e . --no-build-isolation   # -O0 -g, bounds checked
"""

import os
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("EVTCHN_DEBUG_BUILD") == "1"
MODULES = ["_core", "_atomics_test"]

# No -march: the extensions must run on any CPU of the architecture they were built for (the
# kernels are bound by cache-line traffic between processes, not by the instruction set).
# -UNDEBUG re-enables C asserts that Python's own CFLAGS switch off.
CFLAGS = ["-O0", "-g", "-UNDEBUG"] if DEBUG else ["-O3"]
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
}

# Cython and build_ext only compare timestamps, so switching between debug and release would
# silently keep the other mode's C and objects: rebuild everything when the mode changes.
STAMP = Path("build") / "evtchn-build-mode"
MODE = "debug" if DEBUG else "release"
FORCE = not STAMP.is_file() or STAMP.read_text() != MODE

extensions = [
    Extension(
        f"evtchn.{name}",
        [f"evtchn/{name}.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=CFLAGS,
    )
    for name in MODULES
]
# Generated C goes under build/, not beside the sources.
ext_modules = cythonize(
    extensions, compiler_directives=DIRECTIVES, build_dir="build/cython", force=FORCE
)
STAMP.parent.mkdir(exist_ok=True)
STAMP.write_text(MODE)

setup(ext_modules=ext_modules, options={"build_ext": {"force": FORCE}})
