"""Atomic, verifiable artifact I/O.

Every file ctp writes goes to a temporary name in the same directory, is
fsynced, then renamed over the target, so a crash never leaves a half-written
artifact under the real name. Directory artifacts are built in a temporary
sibling directory and renamed into place the same way; both get the permissions
a plain ``open()`` / ``mkdir()`` would give them under the process umask (the
temporary names are created private). Safetensors files carry
a format version, a SHA-256 of their tensors and one of their JSON metadata,
checked on load.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import torch

from ctp.errors import CTPError

FORMAT_VERSION = "1"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic across threads)
    os.umask(mask)
    return mask


def _normal_mode(path: str | Path, directory: bool = False) -> None:
    """Give a ``mkstemp``/``mkdtemp`` result (0600/0700) the mode ``open()``/``mkdir()`` would have given it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def write_error(path: Path, e: OSError) -> CTPError:
    """A failed write (full disk, read-only file system, no permission) as one line naming the path."""
    import errno

    why = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
           errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded",
           errno.EISDIR: "it is a directory", errno.ENOTDIR: "a part of the path is a file"}.get(
        e.errno, e.strerror or str(e))
    return CTPError(f"cannot write {path}: {why}", "free space or pass a writable path; nothing was left half-written")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write_stream(path, lambda f: f.write(data))


def atomic_write_stream(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` atomically from what ``write(file)`` writes (a temporary file renamed into place)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        _normal_mode(tmp)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CTPError(f"{what} {path} does not exist", "check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CTPError(f"{what} {path} is not valid JSON ({e})", "the file is damaged: recreate it") from e


MAX_CONFIG_BYTES = 1 << 20  # experiment and config files are small; a larger one is a mistake or an attack


def _safe_yaml(text: str, what: str, path: Path):
    """``yaml.safe_load`` without aliases: an alias bomb ("billion laughs") is refused, not expanded."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise CTPError(f"{what} {path} uses a YAML alias (*name)", "write the values out in full")
            return super().compose_node(parent, index)

    return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path, what: str = "config file") -> object:
    """Parse a JSON (``.json``) or YAML file, bounded: at most 1 MiB, no YAML aliases, errors in one line."""
    path = Path(path)
    if not path.is_file():
        raise CTPError(f"{what} {path} does not exist", "check the path")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise CTPError(f"{what} {path} is {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} a config may have",
                       "pass the right file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CTPError(f"{what} {path} is not UTF-8 text", "pass a JSON or YAML file") from e
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return _safe_yaml(text, what, path)
    except CTPError:
        raise
    except Exception as e:  # yaml and json raise their own error types
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise CTPError(f"{what} {path} does not parse ({first})", "fix its syntax (JSON or YAML)") from e


def check_output(out: str | Path, *inputs: str | Path | None, flag: str = "--out", directory: bool = False) -> Path:
    """Refuse, before any work, an output path that would destroy an input or cannot be written.

    ``out`` may not be, contain, or lie inside any of ``inputs`` (existing paths;
    hub ids and names that are no path are skipped). Its nearest existing parent
    must be a writable directory, and a file output may not be a directory (nor a
    directory output a file).
    """
    require_text = str(out).strip()
    if not require_text:
        raise CTPError(f"{flag} is empty", f"pass a path to {flag}")
    out = Path(out).expanduser()
    target = out.resolve()
    for given in inputs:
        if given is None or not Path(given).expanduser().exists():
            continue
        src = Path(given).expanduser().resolve()
        if target == src or src in target.parents or target in src.parents:
            raise CTPError(f"{flag} {out} would overwrite the input {given}",
                           f"write to a path outside {given}")
    if out.exists() and out.is_dir() != directory:
        kind = "a directory" if out.is_dir() else "a file"
        raise CTPError(f"{flag} {out} is {kind}", f"pass a {'directory' if directory else 'file'} path to {flag}")
    parent = next((p for p in [target, *target.parents] if p.exists()), None)
    if parent is not None and parent != target and (not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK)):
        raise CTPError(f"{flag} {out} cannot be written: {parent} is not a writable directory",
                       "pass a path in a writable directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise CTPError(f"{flag} {out} is not writable", "pass a writable path")
    return out


def check_free_space(path: str | Path, need: int, what: str, flag: str = "--out") -> None:
    """Refuse, before the work, an output whose file system has less than ``need`` bytes free."""
    target = Path(path).expanduser().resolve()
    parent = next((p for p in [target, *target.parents] if p.exists()), None)
    if parent is None:
        return
    free = shutil.disk_usage(parent).free
    if free < need:
        raise CTPError(f"{flag} {path}: {what} needs about {need / 1e6:,.0f} MB and {parent} has {free / 1e6:,.0f} MB "
                       "free", f"free disk space or pass a {flag} on another disk")


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Build a directory artifact in a temporary sibling, then rename it to ``path``.

    On an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CTPError(f"{path} already exists", "pass another --out or remove it")
    if path.exists() and not path.is_dir():
        raise CTPError(f"{path} exists and is not a directory", "pass another --out")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        _normal_mode(tmp, directory=True)
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the hidden temporaries a killed write of ``path`` left beside it (``.NAME.*.tmp``, ``.NAME.old-*``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = [p for p in path.parent.glob(f".{glob.escape(path.name)}.*")
             if p.name.endswith(".tmp") or p.name.startswith(f".{path.name}.old-")]
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
    return stale



def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of the tensors (order independent)."""
    return digest_of(list(tensors), tensors.__getitem__)


def digest_of(names: list[str], read: Callable[[str], torch.Tensor | tuple]) -> str:
    """:func:`tensors_digest` of tensors read one at a time by ``read(name)``: a tensor, or ``(dtype, shape,
    chunks)`` with the tensor's contiguous values in order as an iterable of tensors (a large tensor then
    never needs to be whole in memory)."""
    h = hashlib.sha256()
    for name in sorted(names):
        got = read(name)
        if isinstance(got, torch.Tensor):
            _digest_update(h, name, got.detach().contiguous().cpu())
            continue
        dtype, shape, chunks = got
        _digest_head(h, name, dtype, tuple(shape))
        for t in chunks:
            if t.numel():
                h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _digest_head(h, name: str, dtype: torch.dtype, shape: tuple) -> None:
    h.update(name.encode())
    h.update(str(dtype).encode())
    h.update(str(shape).encode())


def _digest_update(h, name: str, t: torch.Tensor) -> None:
    _digest_head(h, name, t.dtype, tuple(t.shape))
    h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # 0-d too; no copy


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None,
                 kind: str = "ctp") -> Path:
    """Write safetensors atomically with ``format_version``, ``kind``, ``sha256`` and JSON ``ctp`` metadata."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    extra = json.dumps(metadata or {}, default=str)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "sha256": tensors_digest(tensors),
        "ctp": extra,
        "meta_sha256": _meta_digest(kind, extra),
    }
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def _meta_digest(kind: str, extra: str) -> str:
    """SHA-256 of the kind and the JSON metadata: edits to the description are caught like edits to the tensors."""
    return hashlib.sha256(f"{kind}\0{extra}".encode()).hexdigest()


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def save_tensors_streaming(path: str | Path, names: list[str], read: Callable[[str], torch.Tensor],
                           metadata: dict | None = None, kind: str = "ctp") -> Path:
    """What :func:`save_tensors` writes, with one tensor in memory at a time: ``read(name)`` is called twice per
    tensor (once for the checksum and the layout, once to write it), so the tensors can stay on disk."""
    layout, offset, h = {}, 0, hashlib.sha256()
    order = sorted(names)
    for name in order:
        t = read(name).detach().contiguous().cpu()
        _digest_update(h, name, t)
        n = t.numel() * t.element_size()
        layout[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    extra = json.dumps(metadata or {}, default=str)
    meta = {"format_version": FORMAT_VERSION, "kind": kind, "sha256": h.hexdigest(), "ctp": extra,
            "meta_sha256": _meta_digest(kind, extra)}
    header = json.dumps({"__metadata__": meta, **layout}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)

    def write(f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for name in order:
            t = read(name).detach().contiguous().cpu()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    return atomic_write_stream(path, write)


def load_tensors(path: str | Path, kind: str | None = None, what: str = "artifact") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by :func:`save_tensors`, verifying kind, version and checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CTPError(f"{what} {path} does not exist", "check the path")
    data = path.read_bytes()
    try:
        tensors = load(data)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise _unreadable(what, path, e) from e
    return tensors, _checked_meta(path, meta, kind, what, lambda: tensors_digest(tensors))


def open_tensors(path: str | Path, kind: str | None = None,
                 what: str = "artifact") -> tuple[list[str], Callable[[str], torch.Tensor], dict]:
    """What :func:`load_tensors` checks, with one tensor in memory at a time: (the names, ``read(name)`` giving one
    tensor, the JSON metadata). The checksum is verified first, reading each tensor once."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CTPError(f"{what} {path} does not exist", "check the path")

    def read(name: str) -> torch.Tensor:
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, ValueError, OSError, RuntimeError) as e:
            raise _unreadable(what, path, e) from e

    try:
        with safe_open(str(path), framework="pt") as f:
            meta, names = f.metadata() or {}, list(f.keys())
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise _unreadable(what, path, e) from e
    return names, read, _checked_meta(path, meta, kind, what, lambda: digest_of(names, read))


def _unreadable(what: str, path: Path, e: Exception) -> CTPError:
    return CTPError(f"{what} {path} is not a readable safetensors file ({str(e).splitlines()[0]})",
                    "the file is truncated or damaged: recreate it")


def _checked_meta(path: Path, meta: dict, kind: str | None, what: str, digest: Callable[[], str]) -> dict:
    """The ``ctp`` metadata of a file written by :func:`save_tensors`, once its version, kind and checksums hold."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise CTPError(f"{what} {path} has format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}",
                       "recreate it with this version of ctp")
    if kind is not None and meta.get("kind") != kind:
        raise CTPError(f"{path} is a '{meta.get('kind')}' file, not a {kind}", f"pass a {kind} file")
    if meta.get("sha256") != digest():
        raise CTPError(f"{what} {path} fails its checksum", "the file was modified or damaged: recreate it")
    # files from before the metadata checksum have none; every file written now has one
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta.get("kind", ""), meta.get("ctp", "{}")):
        raise CTPError(f"{what} {path} fails its metadata checksum", "the file was modified or damaged: recreate it")
    try:
        extra = json.loads(meta.get("ctp", "{}"))
    except json.JSONDecodeError as e:
        raise CTPError(f"{what} {path} has damaged metadata", "recreate it") from e
    if not isinstance(extra, dict):
        raise CTPError(f"{what} {path} has damaged metadata (not a mapping)", "recreate it")
    return extra


MMAP_THRESHOLD = 4 << 20  # bytes: from this size up, glibc serves an allocation from its own mapping


@functools.lru_cache(maxsize=None)
def _libc_function(name: str):
    """glibc's function ``name`` through ctypes (the GIL released while it runs), or None without glibc; looked up
    once (finding the C library may run ``ldconfig``), not at every trim."""
    import ctypes
    import ctypes.util

    lib = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(lib) if lib else None
    except OSError:
        return None
    return getattr(libc, name, None) if libc is not None else None


TRIM_PERIOD = 0.05  # seconds between two hand-backs of free heap pages while a compression runs


@contextlib.contextmanager
def trimmed_heap(period: float = TRIM_PERIOD) -> Iterator[bool]:
    """While the body runs, a daemon thread hands the heap's free pages back to the system every ``period``
    seconds (glibc's ``malloc_trim``, which takes the heap's lock: safe beside the allocating thread); yields
    whether it runs (False without glibc). Allocations under the mmap threshold (:func:`map_large_allocations`)
    come from a heap that fragments as a compression goes on; freed there, their pages stay resident until the
    next trim, so a trim after each linear alone let SparseGPT's peak creep up block by block (a 24-block,
    2,048-wide Llama: 1.07 -> 1.26 GB by block 7; trimmed every 50 ms: 1.00 GB, flat; see bench/README.md). A
    trim with nothing to hand back takes microseconds."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        yield False
        return
    import threading

    stop = threading.Event()

    def run() -> None:
        while not stop.wait(period):
            trim(0)

    thread = threading.Thread(target=run, name="ctp-trim-heap", daemon=True)
    thread.start()
    try:
        yield True
    finally:
        stop.set()
        thread.join()


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc give every allocation of ``threshold`` bytes or more its own memory mapping, returned to the
    system the moment it is freed, for the rest of the process (``mallopt(M_MMAP_THRESHOLD)``; False where there
    is no glibc). glibc's default raises that threshold up to 32 MB as large blocks are freed, so a long
    compression, which frees and allocates tensors of many sizes, keeps a fragmented heap at its peak: measured on
    a 24-block, 2,048-wide Llama compressed with GPTQ, see bench/README.md."""
    mallopt = _libc_function("mallopt")
    return mallopt is not None and bool(mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD


def release_memory() -> None:
    """Hand freed heap pages back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Loading a model frees many large temporaries (file buffers, unpacked codes); glibc keeps
    them in the process heap, so the resident size would stay near its peak. Measured after
    loading the 50% + 4-bit SmolLM2 artifact packed: 913 MB resident before, 366 MB after.
    """
    import gc

    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)
