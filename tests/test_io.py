import os

import pytest
import torch

from ctp.errors import CTPError
from ctp.io import (atomic_dir, atomic_write_text, load_tensors, open_tensors, read_json, save_tensors,
                    save_tensors_streaming)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(4, 3, generator=g), "b": torch.arange(7, dtype=torch.int32)}


def _one_at_a_time(path, kind=None, what="artifact"):
    """:func:`open_tensors` read whole: what :func:`load_tensors` returns, for the same checks."""
    names, read, meta = open_tensors(path, kind=kind, what=what)
    return {n: read(n) for n in names}, meta


READERS = pytest.mark.parametrize("load_tensors", [load_tensors, _one_at_a_time], ids=["whole", "one-at-a-time"])


@READERS
@pytest.mark.parametrize("streamed", [False, True])
def test_save_load_identity_with_metadata(load_tensors, streamed, tmp_path):
    p = (save_tensors_streaming(tmp_path / "x.safetensors", list(_tensors()), _tensors().__getitem__,
                                {"k": 3, "name": "p"}, kind="ctp-test") if streamed
         else save_tensors(tmp_path / "x.safetensors", _tensors(), {"k": 3, "name": "p"}, kind="ctp-test"))
    t, meta = load_tensors(p, kind="ctp-test")
    assert meta == {"k": 3, "name": "p"}
    for name, v in _tensors().items():
        assert torch.equal(t[name], v)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@READERS
def test_truncated_file_is_a_clear_error(load_tensors, tmp_path):
    p = save_tensors(tmp_path / "x.safetensors", _tensors(), kind="ctp-test")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 10])
    with pytest.raises(CTPError, match="truncated or damaged"):
        load_tensors(p, kind="ctp-test")


@READERS
def test_tampered_tensor_fails_checksum(load_tensors, tmp_path):
    p = save_tensors(tmp_path / "x.safetensors", _tensors(), kind="ctp-test")
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte
    p.write_bytes(bytes(data))
    with pytest.raises(CTPError, match="checksum"):
        load_tensors(p, kind="ctp-test")


@READERS
def test_wrong_kind_and_missing_file(load_tensors, tmp_path):
    p = save_tensors(tmp_path / "x.safetensors", _tensors(), kind="ctp-a")
    with pytest.raises(CTPError, match="not a ctp-b"):
        load_tensors(p, kind="ctp-b")
    with pytest.raises(CTPError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash while writing")
    assert not target.exists()
    assert os.listdir(tmp_path) == []
    with atomic_dir(target) as d:
        (d / "ok.txt").write_text("done")
    assert (target / "ok.txt").read_text() == "done"
    # replacing an existing artifact keeps the old one until the new one is complete
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            raise RuntimeError
    assert (target / "ok.txt").read_text() == "done"


def test_damaged_json(tmp_path):
    p = atomic_write_text(tmp_path / "c.json", '{"a": 1')
    with pytest.raises(CTPError, match="not valid JSON"):
        read_json(p)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                        (0o002, 0o664, 0o775)])
def test_artifacts_get_the_mode_open_would_give(tmp_path, umask, file_mode, dir_mode):
    """mkstemp/mkdtemp create 0600/0700; the final files honour the umask like open()/mkdir()."""
    import stat

    from ctp.io import atomic_write_json, current_umask

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert stat.S_IMODE(plain.stat().st_mode) == file_mode  # what a normal open() gives
        f = atomic_write_json(tmp_path / "a.json", {"a": 1})
        s = save_tensors(tmp_path / "t.safetensors", _tensors(), kind="ctp-test")
        with atomic_dir(tmp_path / "art") as d:
            atomic_write_json(d / "meta.json", {})
            save_tensors(d / "w.safetensors", _tensors(), kind="ctp-test")
        with atomic_dir(tmp_path / "art") as d:  # replacing an existing directory artifact
            atomic_write_json(d / "meta.json", {})
    finally:
        os.umask(old)
    for p in (f, s, tmp_path / "art" / "meta.json"):
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p
    assert stat.S_IMODE((tmp_path / "art").stat().st_mode) == dir_mode
    assert sorted(os.listdir(tmp_path)) == ["a.json", "art", "plain.txt", "t.safetensors"]  # no temporaries left


def _rewrite_metadata(path, edit) -> None:
    """Rewrite a safetensors header's ``__metadata__`` with ``edit(dict)`` (tensor bytes untouched)."""
    import json
    import struct

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header["__metadata__"])
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)  # keep the data aligned as safetensors does
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def test_edited_metadata_fails_its_checksum(tmp_path):
    import json

    p = save_tensors(tmp_path / "x.safetensors", _tensors(), {"hidden_size": 64}, kind="ctp-test")
    _rewrite_metadata(p, lambda m: m.update(ctp=json.dumps({"hidden_size": 32})))
    with pytest.raises(CTPError, match="fails its metadata checksum"):
        load_tensors(p, kind="ctp-test")
    # files written before the metadata checksum (none recorded) still load
    p = save_tensors(tmp_path / "old.safetensors", _tensors(), {"hidden_size": 64}, kind="ctp-test")
    _rewrite_metadata(p, lambda m: m.pop("meta_sha256"))
    assert load_tensors(p, kind="ctp-test")[1] == {"hidden_size": 64}
    # a format version from elsewhere is refused by name
    _rewrite_metadata(p, lambda m: m.update(format_version="99"))
    with pytest.raises(CTPError, match="format version '99'"):
        load_tensors(p, kind="ctp-test")


_HEAP_PROBE = r"""
import re, sys, torch
from ctp.io import map_large_allocations
def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) << 10
if sys.argv[1] == "map" and not map_large_allocations(1 << 20):
    print("no-glibc")
    sys.exit()
x = torch.empty(4 << 20).fill_(1)
del x  # 16 MB freed: glibc's own threshold rises to it
base = anon()
big, pins = [], []
for _ in range(100):
    big.append(torch.empty(512 << 10).fill_(1))  # 2 MB each
    pins.append(torch.empty(64).fill_(1))  # small and kept: holds the heap's top
del big
print(anon() - base)
"""


def test_large_allocations_leave_the_process_when_freed():
    """After map_large_allocations, freed tensors from the threshold up go back to the system at once, although
    an earlier free raised glibc's own threshold above them and small allocations sit between them."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, "map"], capture_output=True, text=True,
                         check=True).stdout.strip()
    if out == "no-glibc":
        pytest.skip("needs glibc")
    assert int(out) < 4e6  # of 200 MB allocated and freed


_TRIM_PROBE = r"""
import ctypes, re, sys, time
from ctp.io import trimmed_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) << 10
libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD: the blocks below come from the heap, as during a compression
blocks = []
for _ in range(400):
    p = libc.malloc(512 << 10)
    ctypes.memset(p, 1, 512 << 10)  # resident
    blocks.append(p)
for p in blocks[::2]:
    libc.free(p)  # 100 MB free between kept blocks, in the middle of the heap: it stays resident
freed = anon()
with trimmed_heap(0.01) as running:
    if not running:
        print("no-glibc")
        sys.exit()
    time.sleep(0.3)
    during = anon()
print(freed - during)
"""


def test_trimmed_heap_hands_free_heap_pages_back_while_it_runs():
    """Inside trimmed_heap, heap blocks freed between kept ones (100 MB) leave the resident set within a few
    periods, with no call from the body; the thread stops when the body ends."""
    import subprocess
    import sys
    import threading

    from ctp.io import trimmed_heap

    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc")
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True,
                         check=True).stdout.strip()
    if out == "no-glibc":
        pytest.skip("needs glibc")
    assert int(out) > 80e6  # of the 100 MB freed (without the thread they stay: a free trims the heap's top alone)
    with trimmed_heap(0.01):
        assert any(t.name == "ctp-trim-heap" for t in threading.enumerate())
    assert not any(t.name == "ctp-trim-heap" for t in threading.enumerate())
