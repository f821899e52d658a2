"""Build of the compiled extension ``stvit_kernels._C`` (torch.utils.cpp_extension + ninja).

    pip install --no-build-isolation .          # users (torch installed first)
    pip install --no-build-isolation -e .       # development: the _C*.so lands in stvit_kernels/

What gets built:

* always: the host code (``csrc/ops.cpp``: checks, ``torch.ops.stvit`` registration, Python module),
  the refine attention operators (``csrc/refine.cpp``) and the OpenMP CPU kernels
  (``csrc/cpu/*.cpp``);
* the CUDA kernels (``csrc/cuda/*.cu``), compiled with ``-DSTVIT_WITH_CUDA`` for every source, when
  torch is a CUDA build and nvcc is found.

Environment switches:

=====================  ===========================================================================
``STVIT_FORCE_CUDA=1``  build the CUDA kernels; a missing nvcc / CUDA sources is an error
``STVIT_NO_CUDA=1``     never build the CUDA kernels (quick CPU-only builds)
``STVIT_CUDA_ARCH``     ``;``-separated compute capabilities, ``+PTX`` adds PTX of that one;
                        default ``"8.0;9.0+PTX"`` (sm_80 and sm_90 SASS, compute_90 PTX)
``CUDA_HOME``           the CUDA toolkit root; default: the ``TOP`` that nvcc itself reports
``MAX_JOBS``            parallel compile jobs (read by torch's BuildExtension / ninja)
=====================  ===========================================================================

``stvit_kernels/_build_info.py`` records the torch version built against and whether the CUDA
kernels are in, so that :mod:`stvit_kernels._ext` can explain a stale build instead of crashing.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH = "8.0;9.0+PTX"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _log(msg: str) -> None:
    print(f"stvit_kernels setup: {msg}", file=sys.stderr)


def _toolkit_root_from_nvcc(nvcc: str):
    """The toolkit root nvcc itself uses: ``nvcc -dryrun`` prints it as ``#$ TOP=...``.

    ``which nvcc`` may be a wrapper script or a symlink outside the toolkit (``/usr/local/bin``),
    so ``dirname(dirname(which nvcc))`` is not reliable."""
    try:
        out = subprocess.run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _log(f"could not run `{nvcc} -dryrun` ({e})")
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out, re.MULTILINE)
    if m:
        top = os.path.realpath(m.group(1).strip().strip('"'))
        if os.path.isfile(os.path.join(top, "bin", "nvcc")):
            return top
    # nvcc without a dry-run TOP line: fall back on the real path of the binary
    real = os.path.realpath(nvcc)
    top = os.path.dirname(os.path.dirname(real))
    return top if os.path.isfile(os.path.join(top, "bin", "nvcc")) else None


def find_cuda_home():
    """The CUDA toolkit root, or None: the ``TOP`` reported by the nvcc of an explicit
    ``CUDA_HOME`` / ``CUDA_PATH`` (so a wrapper folder such as ``/usr/local`` still resolves to the
    toolkit), else by the nvcc on the PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(nvcc):
                return _toolkit_root_from_nvcc(nvcc)
            _log(f"ignoring {var}={home!r}: it has no bin/nvcc")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return _toolkit_root_from_nvcc(nvcc)


def cuda_arch_flags(spec: str):
    """``"8.0;9.0+PTX"`` -> ``-gencode`` flags for sm_80, sm_90 SASS and compute_90 PTX
    (``9.0a``-style suffixes are kept: ``sm_90a``)."""
    flags = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        arch = item[:-4] if ptx else item
        m = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)", arch)
        if not m:
            raise SystemExit(f"STVIT_CUDA_ARCH: cannot read {item!r} (expected e.g. '8.0;9.0+PTX')")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise SystemExit(f"STVIT_CUDA_ARCH={spec!r} names no architecture")
    return flags


def nvidia_wheel_include_dirs():
    """``site-packages/nvidia/*/include`` of torch's CUDA wheels (cuBLAS, cuSPARSE ... headers that
    torch's CUDA headers include but a bare toolkit may lack)."""
    dirs = []
    for base in sorted(set(sys.path)):
        root = os.path.join(base, "nvidia")
        if base and os.path.isdir(root):
            dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "include"))
                           if os.path.isdir(d))
    seen, out = set(), []
    for d in dirs:
        real = os.path.realpath(d)
        if real not in seen:
            seen.add(real)
            out.append(real)
    return out


def decide_cuda(torch_cuda_version):
    """``(cuda_home or None, reason)``: whether the CUDA kernels get built, and why (not)."""
    force, skip = _flag("STVIT_FORCE_CUDA"), _flag("STVIT_NO_CUDA")
    if force and skip:
        raise SystemExit("STVIT_FORCE_CUDA=1 and STVIT_NO_CUDA=1 contradict each other")
    if skip:
        return None, "STVIT_NO_CUDA=1"
    cu_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
    cuda_home = find_cuda_home()
    problems = []
    if torch_cuda_version is None:
        problems.append("torch is a CPU-only build (torch.version.cuda is None)")
    if cuda_home is None:
        problems.append("nvcc not found (put it on the PATH or set CUDA_HOME)")
    if not cu_sources:
        problems.append("no CUDA sources in csrc/cuda/")
    if problems:
        if force:
            raise SystemExit("STVIT_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
                             + "; ".join(problems))
        return None, "; ".join(problems)
    return cuda_home, f"nvcc under {cuda_home}"


def write_build_info(torch_version: str, with_cuda: bool) -> None:
    path = os.path.join(ROOT, "stvit_kernels", "_build_info.py")
    text = ("# Written by setup.py; read by stvit_kernels/_ext.py before loading _C.\n"
            f"TORCH_VERSION = {torch_version!r}\n"
            f"WITH_CUDA = {with_cuda!r}\n")
    with open(path, "w") as f:
        f.write(text)


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions_and_cmdclass():
    import torch

    torch_cuda = getattr(torch.version, "cuda", None)
    cuda_home, reason = decide_cuda(torch_cuda)
    if cuda_home is not None:
        # torch.utils.cpp_extension resolves CUDA_HOME once, at import, from `which nvcc`:
        # give it the real toolkit root first (and patch it in case it is already imported).
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home

    sources = _rel([os.path.join(ROOT, "csrc", n) for n in ("ops.cpp", "refine.cpp")]
                   + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    # -ffp-contract=fast: FMAs in the AVX2 kernels; -fno-tree-loop-distribute-patterns: keep the
    # short row copies of the kernels inline instead of memcpy calls per cell row
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-tree-loop-distribute-patterns",
                 "-Wno-psabi"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    kwargs = dict(extra_link_args=["-fopenmp"])
    if cuda_home is None:
        _log(f"building the CPU kernels only ({reason})")
        ext_cls = cpp_extension.CppExtension
        extra_compile_args = {"cxx": cxx_flags}
    else:
        arch = os.environ.get("STVIT_CUDA_ARCH", DEFAULT_CUDA_ARCH)
        sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        define_macros.append(("STVIT_WITH_CUDA", None))
        # the toolkit's own headers first, then the CUDA library headers of torch's nvidia wheels
        include_dirs += [d for d in (os.path.join(cuda_home, "include"),
                                     os.path.join(cuda_home, "targets", "x86_64-linux", "include"))
                         if os.path.isdir(d)]
        include_dirs += nvidia_wheel_include_dirs()
        # no -std here: torch's BuildExtension adds the standard its headers need (C++20 for
        # torch 2.14, whose headers use std::strong_ordering: -std=c++17 fails to compile)
        nvcc_flags = ["-O3", "-lineinfo",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_HALF2_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT162_OPERATORS__"
                      ] + cuda_arch_flags(arch)
        _log(f"building the CPU and CUDA kernels ({reason}; torch CUDA {torch_cuda}; "
             f"STVIT_CUDA_ARCH={arch!r})")
        ext_cls = cpp_extension.CUDAExtension
        extra_compile_args = {"cxx": cxx_flags, "nvcc": nvcc_flags}

    ext = ext_cls(name="stvit_kernels._C", sources=sources, include_dirs=include_dirs,
                  define_macros=define_macros, extra_compile_args=extra_compile_args, **kwargs)
    write_build_info(torch.__version__, cuda_home is not None)
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = extensions_and_cmdclass()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
