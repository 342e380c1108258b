"""Build and install pndm_fast: the Python package, the Triton kernels (kernels/ -> pndm_fast.kernels) and the
C++ extension pndm_fast._C (csrc/, pybind11 + OpenMP, no torch headers, so building needs only pybind11)."""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

setup(
    name="pndm_fast",
    version="0.1.0",
    description="PNDM sampling (Liu et al., ICLR 2022), reproduced number for number and made fast",
    packages=find_packages(include=["pndm_fast", "pndm_fast.*"]) + ["pndm_fast.kernels"],
    package_dir={"pndm_fast.kernels": "kernels"},
    package_data={"pndm_fast": ["configs/*.yml", "weights/*"]},
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
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "pyyaml", "pillow", "tqdm", "safetensors", "nvtx"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"], "train": ["scikit-learn"],
                    "diffusers": ["diffusers"]},  # optional: diffusers model folders
    entry_points={"console_scripts": ["pndm-fast = pndm_fast.cli:main"]},
)
