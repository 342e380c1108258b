"""Build and install pndm_fast: the Python package, the Triton kernels (kernels/ -> pndm_fast.kernels) and, when a
C++ compiler with OpenMP works, the C++ extension pndm_fast._C (csrc/, pybind11 + OpenMP, no torch headers, so
building needs only pybind11).

The extension is optional: without a working compiler the build prints why and installs the package without it,
and the fused CPU op falls back to plain torch (`pndm-fast --runner check` says which one runs).
Set PNDM_FAST_REQUIRE_CPP=1 to make a failed build an error instead (a release build that must ship it).
"""

import os
import sys

from pybind11.setup_helpers import Pybind11Extension
from pybind11.setup_helpers import build_ext as pybind11_build_ext
from setuptools import find_packages, setup

# What a missing or broken compiler raises through setuptools' build_ext: CompileError and LinkError (CCompilerError
# subclasses), DistutilsExecError when `CC=false` cannot be run, DistutilsPlatformError when no compiler is known.
try:
    from setuptools.errors import CCompilerError, ExecError, PlatformError
    BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)
except ImportError:  # setuptools < 59
    from distutils.errors import CCompilerError, DistutilsExecError, DistutilsPlatformError
    BUILD_ERRORS = (CCompilerError, DistutilsExecError, DistutilsPlatformError, OSError)


class OptionalBuildExt(pybind11_build_ext):
    """build_ext that skips an extension it cannot compile, with a note, instead of failing the install."""

    def run(self):
        self.skipped = set()
        try:
            super().run()
        except BUILD_ERRORS as err:  # e.g. no compiler known at all, before any extension is tried
            self._skip(err, "pndm_fast._C")
            self.skipped.update(ext.name for ext in self.extensions)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as err:
            self._skip(err, ext.name)
            self.skipped.add(ext.name)

    # What the install copies afterwards (in place, or into an editable or regular wheel) must leave out what
    # was skipped, or setuptools fails on the missing .so.
    def _only_built(self):
        self.extensions = [ext for ext in self.extensions if ext.name not in getattr(self, "skipped", ())]

    def copy_extensions_to_source(self):
        self._only_built()
        super().copy_extensions_to_source()

    def get_outputs(self):
        self._only_built()
        return super().get_outputs()

    def get_output_mapping(self):
        self._only_built()
        return super().get_output_mapping()

    def _skip(self, err, name):
        if os.environ.get("PNDM_FAST_REQUIRE_CPP") == "1":
            raise err
        sys.stderr.write(
            f"\nWARNING: {name} (the C++/OpenMP kernel of the fused CPU op) was not built: {err}\n"
            "pndm_fast installs without it and uses the plain-torch op on the CPU. For the faster kernel, install a\n"
            "C++ compiler with OpenMP (e.g. `apt install g++`) and reinstall (`pip install -e .`).\n\n")


setup(
    name="pndm_fast",
    version="0.1.0",
    description="PNDM sampling (Liu et al., ICLR 2022), reproduced number for number and made fast",
    packages=find_packages(include=["pndm_fast", "pndm_fast.*"]) + ["pndm_fast.kernels"],
    package_dir={"pndm_fast.kernels": "kernels"},
    package_data={"pndm_fast": ["configs/*.yml", "weights/*", "profiles/*.json"]},
    ext_modules=[
        Pybind11Extension(
            "pndm_fast._C",
            ["csrc/lincomb.cpp"],
            cxx_std=17,
            # Plain -O3: -ffast-math would break NaN semantics and reassociate the fp32 sums; no -march=native,
            # so the wheel runs on any x86-64 (SSE2 vectors, see csrc/lincomb.cpp).
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": OptionalBuildExt},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "pillow", "tqdm", "safetensors", "nvtx"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"], "train": ["scikit-learn"],
                    "diffusers": ["diffusers"],  # optional: diffusers model folders, and the peer in studies
                    "plots": ["matplotlib"]},  # the accuracy studies' figures
    entry_points={"console_scripts": ["pndm-fast = pndm_fast.cli:main"]},
)
