"""C functions the read kernels call by name: libzstd's decoder and libc's ``pread``.

A numba kernel calls an external C function by *name* (``numba.types.ExternalFunction``);
the name is resolved when the compiled code is linked, through LLVM's symbol table, where
:func:`register` puts the address found here. Because the machine code refers to a name and
not to an address baked in as a constant, ``@njit(cache=True)`` works: each process registers
the symbols before its first call, and cached code links against them.

libzstd comes from a library a pip-only machine already has, the first that exports every
function needed: numcodecs' zstd extension first (numcodecs wrote the frames, and zarr depends
on it; its extension exports the whole ``ZSTD_*`` API), then backports.zstd, python-zstandard's
cffi backend, the system's libzstd. A Python extension is opened with ctypes only after Python
imported it, so dlopen returns the loaded library and runs nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib
import importlib.util
import os
import threading

ZSTD_SOURCES = ("numcodecs.zstd", "backports.zstd._zstd", "zstandard._cffi", "system")

_ZSTD = {  # name: (restype, argtypes); pointers travel as integers (same ABI on x86-64 and aarch64)
    "ZSTD_createDCtx": (ctypes.c_void_p, []),
    "ZSTD_freeDCtx": (ctypes.c_size_t, [ctypes.c_void_p]),
    "ZSTD_decompressDCtx": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                              ctypes.c_void_p, ctypes.c_size_t]),
    "ZSTD_isError": (ctypes.c_uint, [ctypes.c_size_t]),
    "ZSTD_getErrorName": (ctypes.c_char_p, [ctypes.c_size_t]),
    "ZSTD_versionNumber": (ctypes.c_uint, []),
}


def _library_path(source: str) -> str | None:
    if source == "system":
        return ctypes.util.find_library("zstd")
    try:
        return getattr(importlib.import_module(source), "__file__", None)  # import first: see the docstring
    except ImportError:
        pass
    package, _, name = source.rpartition(".")  # not importable (zstandard._cffi without cffi): still a library
    spec = importlib.util.find_spec(package) if importlib.util.find_spec(package.split(".")[0]) else None
    if spec is None or not spec.submodule_search_locations:
        return None
    hits = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], name + ".*.so"))
    return hits[0] if hits else None


def _zstd_library() -> tuple[str, ctypes.CDLL]:
    tried = []
    for source in ZSTD_SOURCES:
        path = _library_path(source)
        if path is None:
            tried.append(f"{source} (not found)")
            continue
        try:
            lib = ctypes.CDLL(path)
            for name in _ZSTD:
                getattr(lib, name)
        except (OSError, AttributeError) as exc:
            tried.append(f"{source} ({exc})")
            continue
        return path, lib
    raise ImportError("no library here exports libzstd's decoder (tried " + "; ".join(tried) + ")")


_lock = threading.Lock()
_functions: dict | None = None


def register() -> dict:
    """Find the libraries and add the symbols to LLVM's table, once per process; returns
    {name: ctypes function} (also used from Python: DCtx creation, error names)."""
    global _functions
    with _lock:
        if _functions is not None:
            return _functions
        import llvmlite.binding as llvm

        path, lib = _zstd_library()
        functions = {}
        for name, (restype, argtypes) in _ZSTD.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            functions[name] = fn
            llvm.add_symbol(name, ctypes.cast(fn, ctypes.c_void_p).value)
        libc = ctypes.CDLL(None, use_errno=True)
        pread = libc.pread
        pread.restype, pread.argtypes = ctypes.c_ssize_t, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t,
                                                           ctypes.c_int64]
        llvm.add_symbol("pread", ctypes.cast(pread, ctypes.c_void_p).value)
        functions["pread"] = pread
        functions["zstd_library"] = path
        _functions = functions
        return functions


class DecompressionContext:
    """One ZSTD_DCtx (a thread's: zstd contexts are not thread-safe), freed with this object."""

    def __init__(self) -> None:
        functions = register()
        self._free = functions["ZSTD_freeDCtx"]
        self.address = int(functions["ZSTD_createDCtx"]() or 0)
        if not self.address:
            raise MemoryError("ZSTD_createDCtx failed")

    def __del__(self) -> None:
        if getattr(self, "address", 0):
            self._free(self.address)


def zstd_error(result: int) -> str:
    """libzstd's name for an error result of ZSTD_decompressDCtx (as a kernel returned it)."""
    return register()["ZSTD_getErrorName"](ctypes.c_size_t(result).value).decode()


_PER_ITEM: dict = {}


def native_decompress():
    """libzstd's ZSTD_decompressDCtx as a ctypes function (the per-item path; batches use the kernel)."""
    fn = _PER_ITEM.get("decompress")
    if fn is None:
        fn = _PER_ITEM["decompress"] = register()["ZSTD_decompressDCtx"]
        _PER_ITEM["is_error"] = register()["ZSTD_isError"]
    return fn


def native_is_error():
    """libzstd's ZSTD_isError as a ctypes function."""
    native_decompress()
    return _PER_ITEM["is_error"]
