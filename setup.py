"""Build of kvtier's one native part, the CPU row copier (kvtier/transfer/csrc/rowcopy.c).

Everything else is in pyproject.toml. The library is plain C, loaded with ctypes
(kvtier/transfer/native_rows.py); it is optional: without a C compiler kvtier installs and the
CPU path copies with torch and numpy instead."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "kvtier.transfer._native",
            sources=[
                "kvtier/transfer/csrc/rowcopy.c",
                "kvtier/transfer/csrc/job_check.c",
                "kvtier/transfer/csrc/job_plan.c",
            ],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
