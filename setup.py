"""Build definition of lwz. The C++/CUDA extension lwz._C is built by CMake (see CMakeLists.txt).

`pip install --no-build-isolation -e .` runs LwzBuildExt, which configures and builds CMakeLists.txt
with Ninja (2 jobs; MAX_JOBS overrides) and drops lwz/_C*.so next to the Python sources. Without
--no-build-isolation pip builds in an isolated environment that has no torch: the extension is then
skipped with a warning. Offline with recent setuptools: `python setup.py build_ext --inplace`.

Environment:
  LWZ_CUDA=0       build the CPU kernels only
  LWZ_CUDA=1       a missing CUDA toolkit (or a failing CUDA build) is an error
  (unset)          CUDA kernels when a toolkit is found and torch has CUDA
  CUDA_HOME        toolkit root (else CUDA_PATH, the real folder of `nvcc`, /usr/local/cuda*)
  TORCH_CUDA_ARCH_LIST  default "8.0;9.0"
  LWZ_BUILD_TYPE   CMake build type, default Release

Installing never fails because of the extension: a failing CUDA build is retried CPU-only, and if
that fails too, lwz installs without _C (lwz.packing then runs its pure-torch fallback).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[lwz build] {msg}", flush=True)


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and \
        os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """Real root of the CUDA toolkit, or None. `nvcc` on PATH may be a wrapper script, so its folder
    is taken from `nvcc --dryrun` (which prints the folder of the real binary as _HERE_)."""
    for var in ("CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"):
        root = os.environ.get(var)
        if root:
            if _is_toolkit(os.path.realpath(root)):
                return os.path.realpath(root)
            _log(f"{var}={root} is not a CUDA toolkit root (no bin/nvcc or include/cuda_runtime.h)")
            return None
    nvcc = shutil.which("nvcc")
    if nvcc:
        cand = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(cand):
            return cand
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True,
                                 text=True, timeout=60)
            m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
            if m and _is_toolkit(os.path.dirname(os.path.realpath(m.group(1)))):
                return os.path.dirname(os.path.realpath(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    cands = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True) + ["/opt/cuda"]
    for cand in cands:
        if _is_toolkit(os.path.realpath(cand)):
            return os.path.realpath(cand)
    return None


def find_nvrtc():
    """libnvrtc inside the nvidia pip wheel torch installed (the local toolkit may lack nvrtc)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
        roots = list(nvidia.__path__)
    except ImportError:
        roots = []
    for root in roots:
        hits = sorted(p for p in glob.glob(os.path.join(root, "**", "lib", "libnvrtc.so*"), recursive=True)
                      if ".alt." not in p and "builtins" not in p)
        if hits:
            return hits[0]
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class LwzBuildExt(build_ext):
    """Builds lwz._C with CMake; falls back to CPU-only, then to no extension at all."""

    def run(self):
        for ext in self.extensions:
            self.build_extension(ext)

    def build_extension(self, ext):
        mode = os.environ.get("LWZ_CUDA", "").strip().upper()
        mode = {"1": "ON", "TRUE": "ON", "ON": "ON", "0": "OFF", "FALSE": "OFF", "OFF": "OFF"}.get(mode, "AUTO")
        out_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        try:
            import torch  # noqa: F401  (the extension builds against the installed torch)
        except ImportError:
            msg = ("torch is not importable in the build environment (an isolated PEP 517 build?): "
                   "build with `pip install --no-build-isolation -e .`")
            if mode == "ON":
                raise RuntimeError(f"lwz: LWZ_CUDA=1 but {msg}")
            _log(f"WARNING: {msg}; installing without lwz._C (lwz.packing falls back to pure torch)")
            return
        t0 = time.time()
        try:
            self._cmake(ext, out_path, mode)
            _log(f"built {out_path} ({mode}) in {time.time() - t0:.0f} s")
            return
        except (subprocess.CalledProcessError, OSError) as e:
            if mode == "ON":
                raise RuntimeError(f"lwz: LWZ_CUDA=1 and the CUDA build of lwz._C failed: {e}") from e
            if mode == "OFF":
                _log(f"WARNING: the CPU build of lwz._C failed ({e}); installing without it "
                     "(lwz.packing falls back to pure torch)")
                self._remove_stale(out_path)
                return
            _log(f"WARNING: building lwz._C with CUDA failed ({e}); retrying with the CPU kernels only")
        try:
            self._cmake(ext, out_path, "OFF")
            _log(f"built {out_path} (CPU only) in {time.time() - t0:.0f} s")
        except (subprocess.CalledProcessError, OSError) as e:
            _log(f"WARNING: the CPU build of lwz._C failed too ({e}); installing without it "
                 "(lwz.packing falls back to pure torch)")
            self._remove_stale(out_path)

    @staticmethod
    def _remove_stale(out_path):
        if os.path.exists(out_path):  # an older build would otherwise be imported
            os.remove(out_path)

    def _cmake(self, ext, out_path, mode):
        import torch
        import torch.utils

        torch_has_cuda = torch.version.cuda is not None
        cuda_home = find_cuda_home() if torch_has_cuda else None
        # one build folder per configuration, so that no cached toolkit path leaks between them
        kind = ("cpu" if mode == "OFF" else "cuda") + ("" if cuda_home or not torch_has_cuda else "-notoolkit")
        build_dir = os.path.join(ROOT, "build", f"cmake-{kind}")
        os.makedirs(build_dir, exist_ok=True)
        cmake = shutil.which("cmake", path=os.path.dirname(sys.executable)) or shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found (pip install cmake ninja)")
        args = [
            cmake, "-S", ROOT, "-B", build_dir, "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('LWZ_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DLWZ_CUDA={mode}",
            f"-DLWZ_TORCH_HAS_CUDA={'ON' if torch_has_cuda else 'OFF'}",
            f"-DLWZ_OUTPUT_DIR={os.path.dirname(out_path)}",
            f"-DLWZ_EXT_SUFFIX={sysconfig.get_config_var('EXT_SUFFIX')}",
        ]
        ninja = shutil.which("ninja", path=os.path.dirname(sys.executable)) or shutil.which("ninja")
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        env = dict(os.environ)
        if cuda_home:
            env["CUDA_HOME"] = cuda_home
            args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCUDAToolkit_ROOT={cuda_home}"]
            if mode != "OFF":
                args.append(f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda_home, 'bin', 'nvcc')}")
            nvrtc = find_nvrtc()
            if nvrtc:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
            arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
            env["TORCH_CUDA_ARCH_LIST"] = arch
            args.append(f"-DTORCH_CUDA_ARCH_LIST={arch}")
        elif torch_has_cuda and mode == "ON":
            raise OSError("LWZ_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME to its root)")
        _log(f"CUDA toolkit: {cuda_home or 'none'}; LWZ_CUDA={mode}")
        subprocess.run(args, check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", "2")
        subprocess.run([cmake, "--build", build_dir, "-j", jobs], check=True, env=env)
        if not os.path.exists(out_path):
            raise OSError(f"CMake finished but {out_path} is missing")


setup(
    name="lwz",
    version="0.1.0",
    description="Low-level GRPO trainer reproducing LongWriter-Zero",
    packages=find_packages(include=["lwz", "lwz.*", "kernels", "kernels.*", "bench"]),
    python_requires=">=3.11",
    install_requires=["torch>=2.11", "transformers", "safetensors", "numpy", "nvidia-ml-py", "tomli-w"],
    extras_require={"flash": ["flash-attn"], "test": ["pytest", "hypothesis"]},
    include_package_data=True,
    package_data={"kernels": ["logprob_configs.json"]},  # the log-prob launch-config table
    ext_modules=[CMakeExtension("lwz._C")],
    cmdclass={"build_ext": LwzBuildExt},
)
