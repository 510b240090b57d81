"""Drives CMake (ninja generator) to build genie_fast._C; CMakeLists.txt is the build description.

Build without isolation so CMake sees the installed torch:
    pip install --no-build-isolation -e .
Environment: GENIE_FAST_CUDA=AUTO|ON|OFF, CUDA_HOME (default /usr/local/cuda),
TORCH_CUDA_ARCH_LIST (e.g. "9.0" for H100/H200), MAX_JOBS, GENIE_FAST_BUILD_DIR (a CMake build
folder kept between builds, so a rebuild only recompiles what changed; default: setuptools' temporary
one).

Torch is found two ways. With the CUDA kernels, through torch's own CMake config (it sets up
CUDA). Without them (GENIE_FAST_CUDA=OFF, or AUTO without nvcc or without a CUDA torch), from the
paths read here off the installed torch package: torch's config of a CUDA torch looks for the CUDA
toolkit even when no .cu file is built, and fails on a machine that has a CUDA torch but no toolkit.
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# setuptools prints an "Editable installation" note on every editable install whose package-dir
# maps a folder (kernels/ -> genie_fast.kernels): information only, nothing to act on.
warnings.filterwarnings("ignore", message="Editable installation")

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        try:
            import torch
        except ImportError:
            sys.exit("genie_fast: torch must be installed before building (pip install torch==2.13.0), "
                     "and the build must run with --no-build-isolation")
        import cmake  # pip's cmake: the system cmake 3.25 cannot do CUDA with C++20

        from torch.utils import cpp_extension

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(os.environ.get("GENIE_FAST_BUILD_DIR") or Path(self.build_temp) / ext.name).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda_mode = os.environ.get("GENIE_FAST_CUDA", "AUTO").upper()
        if cuda_mode not in ("AUTO", "ON", "OFF"):
            sys.exit(f"genie_fast: GENIE_FAST_CUDA must be AUTO, ON or OFF, got {cuda_mode!r}")
        args = [
            f"-S{ROOT}", f"-B{build_dir}", "-GNinja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DGENIE_FAST_CUDA={cuda_mode}",
            f"-DGENIE_FAST_TORCH_HAS_CUDA={'ON' if torch.version.cuda else 'OFF'}",
            # for a build without CUDA kernels, which does not go through torch's CMake config
            f"-DGENIE_FAST_TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
            f"-DGENIE_FAST_TORCH_LIBRARY_DIR={Path(torch.__file__).resolve().parent / 'lib'}",
            f"-DGENIE_FAST_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        ]
        if torch.version.cuda and cuda_mode != "OFF":
            # /usr/local/bin/nvcc may be a wrapper: point CMake at the real toolkit.
            cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
            nvcc = Path(cuda_home) / "bin" / "nvcc"
            if nvcc.exists():
                args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={cuda_home}",
                         f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}"]
            # Torch's CMake config links nvrtc; a compiler-only toolkit lacks it, but the pip
            # CUDA torch ships it (nvidia/<cuXX>/lib): point CMake there instead of NOTFOUND.
            if not list((Path(cuda_home) / "lib64").glob("libnvrtc.so*")):
                site = Path(torch.__file__).resolve().parent.parent
                found = sorted(site.glob("nvidia/*/lib/libnvrtc.so*")) + sorted(
                    site.glob("nvidia/cuda_nvrtc/lib/libnvrtc.so*"))
                if found:
                    args.append(f"-DCUDA_nvrtc_LIBRARY={found[0]}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        cmake_bin = str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
        subprocess.run([cmake_bin, *args], check=True)
        subprocess.run([cmake_bin, "--build", str(build_dir), "-j", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("genie_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
