"""The native reuse path: C kernels (``_reuse.c``) for the gather/scatter work, torch for GEMMs.

The C file is compiled at first use with the system C compiler (``cc -O3 -march=native
-fopenmp``) into ``$ACCELC_CACHE`` (default ``~/.cache/accelc``), keyed by the source hash and
the machine, written to a temporary name and renamed (several processes may race). Tensors are
passed by pointer (zero copy). :func:`available` says whether the build worked; callers fall
back to the torch reference otherwise.

A cached library is native code run in this process, so it is loaded only when it is provably
the one accelc built: the cache folder is created 0700, and must be a folder owned by this user
that no one else can write to (nor any folder above it, sticky ones like /tmp aside); the
library and the sha256 recorded beside it when it was built (``reuse-<key>.so.sha256``) must be
regular files owned by this user and writable by no one else, and the bytes loaded (through the
descriptor that was hashed, not the name) must have that hash. A library that fails any of this
is rebuilt; where the cache folder itself is unsafe, the library is built into a private
temporary folder for this process only.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from .kernels import ReuseContext, _weight_chunks, exact_input_grad
from .kernels import hash_buckets as conv_hash
from .spec import ConvGeom, ReuseSpec

_SRC = Path(__file__).with_name("_reuse.c")
_lib = None
_error: str | None = None


class _Geom(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_int)
        for n in ("N", "C", "Hin", "Win", "kh", "kw", "sh", "sw", "pt", "pl", "dh", "dw", "Ho", "Wo", "L", "G")
    ]


def _cache_dir() -> Path:
    return Path(os.environ.get("ACCELC_CACHE") or Path.home() / ".cache" / "accelc")


def _others_can_write(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _unsafe_dir(d: Path) -> str | None:
    """Why the folder ``d`` (created 0700 when missing) cannot hold native code this process
    loads, or None: it must be a folder owned by this user that no one else can write, and each
    folder above it owned by this user or root and writable by no one else unless sticky."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        real = d.resolve(strict=True)
        st = os.stat(real)
    except OSError as e:
        return f"cannot create the kernel cache {d}: {e.strerror or e}"
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        return f"the kernel cache {d} is not a folder"
    if st.st_uid != uid:
        return f"the kernel cache {d} is owned by another user"
    if _others_can_write(st):
        return f"the kernel cache {d} can be written by other users"
    for up in real.parents:
        try:
            sp = os.stat(up)
        except OSError as e:
            return f"cannot check {up}: {e.strerror or e}"
        if sp.st_uid not in (uid, 0) or (_others_can_write(sp) and not sp.st_mode & stat.S_ISVTX):
            return f"the folder {up} above the kernel cache can be changed by other users"
    return None


def _own_file(fd: int) -> bool:
    """An open file is a regular file owned by this user that no one else can write."""
    st = os.fstat(fd)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not _others_can_write(st)


def _recorded_hash(record: Path) -> str | None:
    """The sha256 recorded when the library was built, if the record is trustworthy."""
    try:
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not _own_file(fd):
            return None
        text = fh.read(100).decode("ascii", "replace").strip()
    return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None


def _key() -> str:
    src = _SRC.read_bytes()
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256(src + platform.machine().encode() + cpu.encode()).hexdigest()[:16]


def _compile(folder: Path) -> tuple[Path, str]:
    """Compile ``_reuse.c`` into a new file in ``folder``; (its path, its sha256)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) found; install gcc for the fast reuse kernels")
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-o", tmp, str(_SRC)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"building the reuse kernels failed: {r.stderr.strip().splitlines()[-1:]}")
        os.chmod(tmp, 0o700)
        with open(tmp, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return Path(tmp), digest


def _build(private: bool = False) -> tuple[Path, str, bool]:
    """(library, the sha256 it must have, whether it is a private build): the cached library
    where its recorded hash is trustworthy, else one built now (and recorded for the next
    process); with ``private``, or where the cache folder is unsafe, one built now into a new
    private temporary folder for this process only."""
    folder = _cache_dir()
    if private or _unsafe_dir(folder) is not None:
        own = Path(tempfile.mkdtemp(prefix="accelc-reuse-"))
        try:
            return (*_compile(own), True)
        except BaseException:
            shutil.rmtree(own, ignore_errors=True)
            raise
    key = _key()
    out = folder / f"reuse-{key}.so"
    record = folder / f"reuse-{key}.so.sha256"
    want = _recorded_hash(record)
    if want is not None and out.is_file():
        return out, want, False
    tmp, digest = _compile(folder)
    fd, rec_tmp = tempfile.mkstemp(suffix=".sha256", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(digest + "\n")
        os.replace(tmp, out)
        os.replace(rec_tmp, record)
    finally:
        for t in (tmp, rec_tmp):
            if os.path.exists(t):
                os.unlink(t)
    return out, digest, False


def _load(path: Path, digest: str):
    """dlopen ``path`` if it is this user's own file with sha256 ``digest``, through the
    descriptor that was hashed (a file swapped in after the check is never the one loaded);
    None where it is not."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        if not _own_file(fd):
            return None
        h = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            h.update(chunk)
        if h.hexdigest() != digest:
            return None
        by_fd = f"/proc/self/fd/{fd}"
        return ctypes.CDLL(by_fd if os.path.exists(by_fd) else str(path))
    finally:
        os.close(fd)


def _open_verified():
    """The reuse library, loaded only as :func:`_load` allows: the cached one; else (its bytes
    are not the ones recorded) one built now into the cache; else one built for this process."""
    for attempt in ("cached", "rebuilt", "private"):
        path, digest, private = _build(private=attempt == "private")
        try:
            so = _load(path, digest)
        finally:
            if private:  # loaded (or refused): the private copy is no longer needed
                shutil.rmtree(path.parent, ignore_errors=True)
        if so is not None:
            return so
        if not private:  # not the library recorded: drop it and its record, build again
            for p in (path, path.with_name(path.name + ".sha256")):
                try:
                    os.unlink(p)
                except OSError:
                    pass
    raise RuntimeError("the reuse kernels just built do not match their own hash; not loaded")


def lib():
    global _lib, _error
    if _lib is None and _error is None:
        try:
            so = _open_verified()
            P, I = ctypes.c_void_p, ctypes.c_int
            so.reuse_compact.argtypes = [P, I, I, I, I, I, P, P, I]
            so.reuse_compact.restype = I
            so.reuse_hash.argtypes = [P, P, P, ctypes.POINTER(_Geom), I, I, P, I]
            so.reuse_sums.argtypes = [P, P, ctypes.POINTER(_Geom), I, P, P, I]
            so.reuse_scatter_dx.argtypes = [P, P, ctypes.POINTER(_Geom), P, I]
            so.reuse_gather_out.argtypes = [P, P, P, I, I, I, I, P, I]
            so.reuse_grad_sums.argtypes = [P, P, I, I, I, I, I, P, I]
            _lib = so
        except (OSError, RuntimeError) as e:
            _error = str(e)
    if _lib is None:
        raise RuntimeError(_error)
    return _lib


def error() -> str | None:
    """Why the native kernels are unavailable (None if they built or were not tried yet)."""
    return _error


def available() -> bool:
    try:
        lib()
        return True
    except RuntimeError:
        return False


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _geom(geom: ConvGeom, spec: ReuseSpec, x: torch.Tensor, out_hw, padded: bool = False) -> _Geom:
    """Geometry for the kernels: of the input itself, or (``padded``) of its zero-padded copy."""
    n, c, h, w = x.shape
    pt, pl = (0, 0) if padded else geom.pads[:2]
    return _Geom(
        n,
        c,
        h,
        w,
        geom.kh,
        geom.kw,
        geom.stride[0],
        geom.stride[1],
        pt,
        pl,
        geom.dilation[0],
        geom.dilation[1],
        out_hw[0],
        out_hw[1],
        spec.L,
        spec.chunks(geom.K),
    )


def _padded(x: torch.Tensor, geom: ConvGeom) -> torch.Tensor:
    pt, pl, pb, pr = geom.pads
    if not any(geom.pads):
        return x.contiguous()
    return torch.nn.functional.pad(x, (pl, pr, pt, pb)).contiguous()


def hash_buckets(
    x: torch.Tensor,
    planes: torch.Tensor,
    geom: ConvGeom,
    spec: ReuseSpec,
    mu: torch.Tensor | None = None,
    xp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as reuse_kernels.hash_buckets, computed by one fused C pass over the input."""
    n, _, h, w = x.shape
    ho, wo = geom.out_hw(h, w)
    G = spec.chunks(geom.K)
    xp = _padded(x, geom) if xp is None else xp
    mu = x.mean(dim=(0, 2, 3)) if mu is None else mu
    mu_k = torch.zeros(G * spec.L)
    mu_k[: geom.K] = mu.repeat_interleave(geom.kh * geom.kw)
    hs = -(-spec.H // 8) * 8
    pl = torch.zeros(G, spec.L, hs)
    pl[:, :, : spec.H] = planes
    out = torch.empty(n, G, ho * wo, dtype=torch.int32)
    q = _geom(geom, spec, xp, (ho, wo), padded=True)
    lib().reuse_hash(_ptr(xp), _ptr(pl), _ptr(mu_k), ctypes.byref(q), spec.H, hs, _ptr(out), _threads())
    return out


def _ptr(t: torch.Tensor) -> int:
    if not (t.is_contiguous() and t.device.type == "cpu" and t.dtype in (torch.float32, torch.int32, torch.int64)):
        raise TypeError(f"reuse kernels take contiguous CPU float32/int32 tensors, got {t.dtype} on {t.device}")
    return t.data_ptr()


def compact(buckets: torch.Tensor, spec: ReuseSpec) -> tuple[torch.Tensor, list]:
    n, G, p = buckets.shape
    buckets = buckets.contiguous()
    ids = torch.empty_like(buckets)
    ncl = torch.empty(G, dtype=torch.int64)
    if (
        lib().reuse_compact(
            _ptr(buckets), n, G, p, spec.H, int(spec.scope == "image"), _ptr(ids), _ptr(ncl), _threads()
        )
        != 0
    ):
        raise MemoryError("reuse_compact: out of memory")
    offsets = [0]
    for c in ncl.tolist():
        offsets.append(offsets[-1] + int(c))
    ids += torch.tensor(offsets[:-1], dtype=torch.int32).view(1, G, 1)
    return ids, offsets


def _tick(prof: dict | None, phase: str, t0: float) -> float:
    """Add the seconds since ``t0`` to ``prof[phase]`` (when profiling); the time now."""
    t = time.perf_counter()
    if prof is not None:
        prof[phase] = prof.get(phase, 0.0) + (t - t0)
    return t


def forward(x, w, b, planes, geom: ConvGeom, spec: ReuseSpec, buckets=None, prof: dict | None = None):
    """Hash, cluster and compute the reused conv. Returns (y, ReuseContext). ``prof``: a dict the
    phases' seconds are added to (the machine profile of :mod:`.predict`)."""
    t = time.perf_counter()
    if buckets is None:
        if spec.L % (geom.kh * geom.kw) == 0:  # chunks are whole channels: one grouped conv (oneDNN)
            buckets = conv_hash(x, planes, geom, spec)
            t = _tick(prof, "hash_conv", t)
        else:
            buckets = hash_buckets(x, planes, geom, spec)
            t = _tick(prof, "hash_rows", t)
    ids, offsets = compact(buckets, spec)
    _tick(prof, "compact", t)
    return forward_with_ids(x, w, b, ids, offsets, geom, spec, prof)


def forward_with_ids(x, w, b, ids, offsets, geom: ConvGeom, spec: ReuseSpec, prof: dict | None = None):
    t = time.perf_counter()
    x = x.contiguous()
    if x.dtype != torch.float32 or ids.dtype != torch.int32:
        raise TypeError("native reuse: x must be float32 and ids int32")
    n, _, h, wd = x.shape
    ho, wo = geom.out_hw(h, wd)
    G = spec.chunks(geom.K)
    T = offsets[-1]
    q = _geom(geom, spec, x, (ho, wo))
    sums = torch.zeros(T, spec.L)
    counts = torch.zeros(T)
    ids = ids.contiguous()
    lib().reuse_sums(
        _ptr(x), _ptr(ids), ctypes.byref(q), int(spec.scope == "image"), _ptr(sums), _ptr(counts), _threads()
    )
    centroids = sums.div_(counts.clamp_min(1).unsqueeze(1))
    t = _tick(prof, "sums", t)
    wg = _weight_chunks(w, G, spec.L)
    co = w.shape[0]
    pm = torch.empty(T, co)
    for g in range(G):
        torch.mm(centroids[offsets[g] : offsets[g + 1]], wg[g], out=pm[offsets[g] : offsets[g + 1]])
    t = _tick(prof, "gemm", t)
    y = torch.empty(n, co, ho, wo)
    bias = b.contiguous() if b is not None else None
    lib().reuse_gather_out(
        _ptr(pm), _ptr(ids), _ptr(bias) if bias is not None else None, n, G, ho * wo, co, _ptr(y), _threads()
    )
    _tick(prof, "gather", t)
    return y, ReuseContext(ids, list(offsets), centroids, counts, (h, wd), (ho, wo))


def backward(
    dy,
    x,
    w,
    ctx: ReuseContext,
    geom: ConvGeom,
    spec: ReuseSpec,
    need_dx: bool = True,
    need_dw: bool = True,
    prof: dict | None = None,
):
    t = time.perf_counter()
    dy = dy.contiguous()
    n, co, ho, wo = dy.shape
    G = spec.chunks(geom.K)
    T = ctx.offsets[-1]
    off = ctx.offsets
    db = dy.sum(dim=(0, 2, 3))
    if not need_dw and (spec.input_grad == "exact" or not need_dx):
        t = _tick(prof, "grad_sums", t)
        dx = exact_input_grad(dy, x, w, geom) if need_dx else None
        _tick(prof, "dx_exact", t)
        return dx, None, db
    gs = torch.zeros(T, co)
    by_image = int(spec.scope == "image" and not ctx.shared)
    lib().reuse_grad_sums(_ptr(dy), _ptr(ctx.ids), n, G, ho * wo, co, by_image, _ptr(gs), _threads())
    t = _tick(prof, "grad_sums", t)
    dwg = torch.empty(G, spec.L, co)
    for g in range(G):
        torch.mm(ctx.centroids[off[g] : off[g + 1]].t(), gs[off[g] : off[g + 1]], out=dwg[g])
    dw = dwg.reshape(G * spec.L, co)[: geom.K].t().reshape(w.shape).contiguous()
    t = _tick(prof, "gemm", t)
    if not need_dx:
        dx = None
    elif spec.input_grad == "exact":
        dx = exact_input_grad(dy, x, w, geom)
        _tick(prof, "dx_exact", t)
    else:
        wg = _weight_chunks(w, G, spec.L)
        d = gs.div_(ctx.counts.clamp_min(1).unsqueeze(1))
        dc = torch.empty(T, spec.L)
        for g in range(G):
            torch.mm(d[off[g] : off[g + 1]], wg[g].t(), out=dc[off[g] : off[g + 1]])
        t = _tick(prof, "gemm", t)
        dx = torch.zeros(n, x.shape[1], *ctx.hw)
        q = _geom(geom, spec, dx, (ho, wo))
        lib().reuse_scatter_dx(_ptr(dc), _ptr(ctx.ids), ctypes.byref(q), _ptr(dx), _threads())
        _tick(prof, "scatter_dx", t)
    return dx, dw, db
