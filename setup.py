"""Build definition of lwz. The C++/CUDA extension lwz._C is built by CMake (see CMakeLists.txt)."""

from setuptools import find_packages, setup

setup(
    name="lwz",
    version="0.1.0",
    description="Low-level GRPO trainer reproducing LongWriter-Zero",
    packages=find_packages(include=["lwz", "lwz.*", "kernels", "kernels.*", "bench"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "transformers", "safetensors", "numpy", "nvidia-ml-py"],
    extras_require={"flash": ["flash-attn"], "test": ["pytest", "hypothesis"]},
    include_package_data=True,
)
