"""Builds the optional fused CPU kernel; all other metadata lives in pyproject.toml.

The kernel is plain C (no torch headers), so it compiles in about a second with any C compiler. When
it cannot be built (no compiler, an unusual platform) the installation still succeeds: adoptim then
runs its foreach kernel where the fused one was asked for and says so once, with a warning.
"""

from __future__ import annotations

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """``build_ext`` that reports a failed build of the kernel instead of failing the installation."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler or platform failure
            self._report(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._report(exc)

    @staticmethod
    def _report(exc: BaseException) -> None:
        print(
            f"WARNING: adoptim's fused CPU kernel was not built ({exc}); the package installs without "
            "it and uses the foreach kernel instead of fused=True on CPU.",
            file=sys.stderr,
        )


def _compile_args() -> list[str]:
    if sys.platform == "win32":
        return ["/O2"]
    # -fno-math-errno lets sqrt vectorise; no -ffast-math: NaN and rounding must follow IEEE.
    return ["-O3", "-fno-math-errno", "-pthread", "-std=gnu11", "-fvisibility=hidden"]


kernel = Extension(
    "adoptim.kernels._adopt_cpu",
    sources=[f"src/adoptim/kernels/csrc/{name}.c"
             for name in ("elementwise", "threads", "step", "bandwidth", "facts", "module", "lowbit")],
    depends=["src/adoptim/kernels/csrc/adopt_cpu.h"],
    extra_compile_args=_compile_args(),
    # -ldl: dlopen, to find torch's OpenMP runtime (part of libc from glibc 2.34 on).
    extra_link_args=[] if sys.platform == "win32" else
    ["-pthread"] + (["-ldl"] if sys.platform.startswith("linux") else []),
    optional=True,
)

setup(ext_modules=[kernel], cmdclass={"build_ext": OptionalBuildExt})
