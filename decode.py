"""Decode every image of a split once, into one uint8 array cached on disk (S3L's small data at
small resolution: Cao & Wu 2021, arXiv 2103.13559).

Each image is decoded with Pillow (EXIF, every colour mode, huge photos reduced first), its shorter
side resized to the store's size (store_short_side) and its aspect ratio kept up to MAX_ASPECT; the
split becomes one (N, 3, L, L) uint8 array, each image at the top-left of its canvas, with each
image's (h, w), written atomically with a checksum and memory-mapped. The cache key covers every
file's path, size and mtime; decode workers, free space, Ctrl-C and stale files are handled.
"""
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import stat
import sys
import time
import warnings

import numpy as np
from PIL import Image

import devices
from augment import RESIZE_RATIO

CACHE_VERSION = 3  # bump when decode_image or the cache files change: old caches are not reused
CACHE_VERIFY_MAX_BYTES = 4 * 2**30  # cache entries up to this size are checksummed on every read
# (1.3 GB/s measured here: 0.3 s for Flowers-102 at 112 px); larger ones get their size checked
# Photos keep their aspect ratio up to long/short = 4/3, RandomResizedCrop's widest ratio: 4:3
# photos (CUB's 500 x 375, Flowers-102's median) stay whole, wider ones lose a strip at each end
# (3.9% of the long side on average for Flowers-102; 80% of its photos are within 3:2, 62% within
# 4:3). The square canvas (portrait and landscape share it) costs 1.78x the bytes of the centre
# square crops used to come from, and the resampling cost grows with it: measured at 64 px, a 3:2
# cap made the batched augmentation 1.5x slower than 4:3 (999 vs 1,503 images/s).
MAX_ASPECT = 4 / 3


# ----- decode once, cache on disk -----------------------------------------------------------------

def store_short_side(input_size: int, min_crop_scale: float = None) -> int:
    """The store's shorter side (px) for input_size. Pretraining (min_crop_scale: RandomResized-
    Crop's scale[0]): ceil(input_size / sqrt(it)), so even a minimum-area crop is downsampled,
    never enlarged (144 px for 64, 251 px for 112 at scale 0.2). None (fine-tuning, evaluation):
    round(input_size x 8/7), the official Resize before the crop."""
    if min_crop_scale is None:
        return round(input_size * RESIZE_RATIO)
    return math.ceil(input_size / math.sqrt(min_crop_scale))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / 32-bit greyscale: Pillow's convert("RGB") clips at 255, so scale the real range
        # instead
        a = np.asarray(im, dtype=np.float32)
        top = 1.0 if im.mode == "F" and a.max() <= 1.0 else (255.0 if a.max() <= 255 else 65535.0)
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels hold arbitrary colours: composite on white instead of dropping alpha
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")  # also CMYK, YCbCr, L, 1 and P


# EXIF orientation tag -> the transpose that shows the photo upright (as ImageOps.exif_transpose)
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                  4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                  6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def decode_image(path: str, short_side: int, max_aspect: float = MAX_ASPECT) -> np.ndarray:
    """One image -> uint8 (3, h, w): EXIF orientation applied, RGB, the shorter side resized to
    `short_side` (antialiased bilinear, as torchvision's Resize; never upscaled), the longer side
    centre-cropped to at most round(shorter x max_aspect). Raises OSError / ValueError for
    unreadable, truncated or non-image files, and for non-regular ones (a FIFO would block)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a named pipe" if stat.S_ISFIFO(mode) else "a device or socket"
        raise OSError(f"not a regular file ({kind})")
    with warnings.catch_warnings():
        # a photo of over 89 megapixels is decoded once and reduced at once below (Pillow
        # still refuses those over 179 as decompression bombs: skipped, with its reason)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        original = Image.open(path)
    with original:
        original.draft("RGB", (short_side, short_side))  # JPEG: the smallest DCT scale >= it
        orientation = original.getexif().get(0x0112)  # EXIF's, read before any reduction
        im, factor = original, min(original.size) // (4 * short_side)
        if factor >= 2 and original.mode in ("RGB", "RGBA", "L", "LA", "I", "F"):
            # a huge PNG or TIFF: factor x factor box means first (still >= 4x the short side), so
            # every copy below is small (a 121-megapixel PNG peaked at 1.65 GB without it)
            im = original.reduce(factor)
            original.close()  # its pixels are freed now, not at the end of the block
        if orientation in EXIF_TRANSPOSE:
            im = im.transpose(EXIF_TRANSPOSE[orientation])
        im = _to_rgb(im)
        w, h = im.size
        short = min(w, h, short_side)
        if short < min(w, h):
            w, h = max(1, round(w * short / min(w, h))), max(1, round(h * short / min(w, h)))
            im = im.resize((w, h), Image.BILINEAR)
        long_max = max(1, round(short * max_aspect))
        left, top = max(0, (w - long_max) // 2), max(0, (h - long_max) // 2)
        im = im.crop((left, top, left + min(w, long_max), top + min(h, long_max)))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _ignore_sigint():
    """Decode workers leave Ctrl-C to the main process, which stops them and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode_or_error(job):
    path, short_side, max_aspect = job
    try:
        return decode_image(path, short_side, max_aspect), None
    except Exception as e:  # noqa: BLE001 -- any decoder failure means: skip this file, say why
        return None, f"{type(e).__name__}: {e}"


def _cache_key(paths, short_side: int, max_aspect: float) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION} short_side={short_side} max_aspect={max_aspect!r}\n"
                     .encode())
    for p in paths:  # a changed, added or removed file changes the key
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:  # a dangling link, no permission: decoding skips it and says why
            stamp = "unreadable"
        # surrogateescape: a file name that is not valid UTF-8 is hashed by its bytes
        h.update(f"{os.path.abspath(p)}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:20]


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_free_space(cache_dir: str, needed: int, name: str) -> None:
    """Refuse to decode into a disk without room (a memory-mapped write there is a bus error)."""
    free = shutil.disk_usage(cache_dir).free
    if free < needed + 2**24:
        raise ValueError(f"decoding {name} needs up to {format_bytes(needed)} in --cache-dir "
                         f"{cache_dir}, which has {format_bytes(free)} free: free some space, pass "
                         "another --cache-dir, a lower --cache-max-gb (older splits are removed) "
                         "or a smaller --store-size")


def _compact(tmp: str, n: int, canvas: int) -> str:
    """The decode buffer cut to (n, 3, canvas, canvas) (skipped files, smaller photos): its path."""
    src = np.load(tmp, mmap_mode="r")
    if src.shape[0] == n and src.shape[-1] == canvas:
        return tmp
    path = tmp[:-len(".tmp.npy")] + ".compact.tmp.npy"  # keeps the writer's tag (_temp_tag)
    _check_free_space(os.path.dirname(tmp), n * 3 * canvas ** 2, os.path.basename(tmp))
    dst = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 3, canvas, canvas))
    for start in range(0, n, 256):  # in chunks: the buffer may be larger than memory
        stop = min(start + 256, n)
        dst[start:stop] = src[start:stop, :, :canvas, :canvas]
    dst.flush()
    del dst, src
    os.remove(tmp)
    return path


def prune_cache(cache_dir: str, max_bytes: int, keep: str, log=print) -> None:
    """Remove the least recently used decoded splits (any version) until the cache holds at most
    max_bytes; `keep` (the split in use) stays."""
    entries = []
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name.endswith(".npy") and not name.endswith(".tmp.npy") and path != keep + ".npy":
            entries.append((os.path.getmtime(path), os.path.getsize(path), path))
    total = sum(size for _, size, _ in entries) + os.path.getsize(keep + ".npy")
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        for stale in (path, path[:-len(".npy")] + ".json"):
            if os.path.exists(stale):
                os.remove(stale)
        total -= size
        log(f"cache over {format_bytes(max_bytes)}: removed {path} ({format_bytes(size)})")


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _temp_tag() -> str:
    """host-pid, in this process's temporary file names (remove_stale_temps)."""
    return f"{socket.gethostname().replace('.', '_')}-{os.getpid()}"


STALE_TEMP = re.compile(r"\.(?:(?P<host>[^./]+)-)?(?P<pid>\d+)\.(?:compact\.tmp\.npy|tmp\.npy|"
                        r"json\.tmp)$")


def remove_stale_temps(cache_dir: str, log=print) -> None:
    """Remove the temporary files of killed decodes on this host (their process is gone): they
    would fill the disk, uncounted by prune_cache."""
    host = socket.gethostname().replace(".", "_")
    for name in os.listdir(cache_dir):
        m = STALE_TEMP.search(name)
        if not m or m["host"] not in (None, host) or devices.pid_alive(int(m["pid"])):
            continue
        path = os.path.join(cache_dir, name)
        with contextlib.suppress(OSError):
            size = os.path.getsize(path)
            os.remove(path)
            log(f"cache: removed {path} ({format_bytes(size)}), left by an interrupted decode")


def _read_cache(base: str, name: str, short_side: int, log):
    """(images memmap, sizes, kept) from base.npy + base.json, or None; a damaged entry (empty,
    truncated, bytes off its checksum) is named and removed, so it is decoded again."""
    if not (os.path.exists(base + ".npy") and os.path.exists(base + ".json")):
        return None
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
        images = np.load(base + ".npy", mmap_mode="r")
        sizes = np.asarray(meta["sizes"], dtype=np.int64).reshape(-1, 2)
        if images.shape[0] != len(sizes) or len(sizes) != len(meta["kept"]):
            raise ValueError(f"{images.shape[0]} images but {len(sizes)} sizes")
        nbytes = os.path.getsize(base + ".npy")
        if nbytes != meta["nbytes"]:
            raise ValueError(f"{nbytes} bytes, {meta['nbytes']} written")
        if nbytes <= CACHE_VERIFY_MAX_BYTES and _file_sha256(base + ".npy") != meta["sha256"]:
            raise ValueError("its bytes do not match the checksum written with it")
    except Exception as e:  # noqa: BLE001 -- an empty .npy raises EOFError, a garbled header more
        log(f"cache {base}.npy is damaged ({type(e).__name__}: {e}): removed, decoding again")
        for suffix in (".npy", ".json"):
            with contextlib.suppress(OSError):
                os.remove(base + suffix)
        return None
    os.utime(base + ".npy")  # recently used: prune_cache removes the oldest first
    log(f"{name}: {len(sizes)} images, short side <= {short_side} px, canvas {images.shape[-1]} "
        f"px, {format_bytes(images.nbytes)} from cache {base}.npy")
    return images, sizes, meta["kept"]


def _decode_into(out: np.ndarray, listing, short_side: int, max_aspect: float,
                 workers: int):
    """Decode every file of `listing` into the rows of `out` (N, 3, L, L), packed: a skipped file
    leaves no hole. Returns (kept indices, sizes (h, w), skipped (path, error))."""
    n, kept, sizes, skipped = len(listing.paths), [], [], []
    t0 = shown = time.time()
    jobs = [(p, short_side, max_aspect) for p in listing.paths]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(workers, _ignore_sigint) \
        if workers > 1 and n >= 64 else None
    results = pool.imap(_decode_or_error, jobs, chunksize=16) if pool else \
        map(_decode_or_error, jobs)
    finished = False
    try:
        for i, (img, err) in enumerate(results):
            if err is None:
                h, w = img.shape[1:]
                out[len(kept), :, :h, :w] = img
                kept.append(i)
                sizes.append((h, w))
            else:
                skipped.append((listing.paths[i], err))
            if time.time() - shown > 2 or i == n - 1:
                shown = time.time()
                rate = (i + 1) / max(shown - t0, 1e-9)
                print(f"\rdecoding {listing.name}: {i + 1}/{n} ({rate:.0f} img/s)", end="",
                      file=sys.stderr, flush=True)
        finished = True
    finally:
        if pool and finished:
            pool.close()
        elif pool:  # Ctrl-C or an error: the workers stop now, not after the whole split
            pool.terminate()
        if pool:
            pool.join()
    print(file=sys.stderr)
    return kept, sizes, skipped


def load_split(listing, short_side: int, cache_dir: str, workers: int = 0, log=print,
               max_aspect: float = MAX_ASPECT, max_bytes: int = None):
    """Decode a split (a data.Listing) once, cached in `cache_dir` and memory-mapped. Returns
    (images: np.memmap uint8 (N_ok, 3, L, L), each at the top-left of its canvas, L the largest long
    side; sizes: int64 (N_ok, 2) = (h, w); kept: the indices of listing.paths that decoded).
    Unreadable files are skipped and counted. workers: 0 is every core. max_bytes: prune_cache's."""
    if max_aspect < 1:
        raise ValueError(f"max_aspect {max_aspect} < 1: it bounds long side / short side")
    os.makedirs(cache_dir, exist_ok=True)
    remove_stale_temps(cache_dir, log)
    key = _cache_key(listing.paths, short_side, max_aspect)
    base = os.path.join(cache_dir, f"{listing.name}-{short_side}px-{max_aspect:.3g}-{key}")
    cached = _read_cache(base, listing.name, short_side, log)
    if cached:
        return cached
    n, long_max, t0 = len(listing.paths), max(1, round(short_side * max_aspect)), time.time()
    tmp, meta_tmp = f"{base}.{_temp_tag()}.tmp.npy", f"{base}.{_temp_tag()}.json.tmp"
    _check_free_space(cache_dir, n * 3 * long_max ** 2, listing.name)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(n, 3, long_max, long_max))  # zeros outside images
        kept, sizes, skipped = _decode_into(out, listing, short_side, max_aspect,
                                            workers or os.cpu_count() or 1)
        out.flush()
        del out
        for path, err in skipped[:10]:
            log(f"skipped unreadable image {path}: {err}")
        if skipped:
            log(f"{listing.name}: skipped {len(skipped)} unreadable of {n} files")
        if not kept:
            raise ValueError(f"none of the {n} images of {listing.name} could be decoded "
                             f"(first: {skipped[0][0]}: {skipped[0][1]})")
        tmp = _compact(tmp, len(kept), max(max(hw) for hw in sizes))
        with open(meta_tmp, "w") as f:
            json.dump({"kept": kept, "sizes": sizes, "skipped": skipped,
                       "short_side": short_side, "max_aspect": max_aspect,
                       "nbytes": os.path.getsize(tmp), "sha256": _file_sha256(tmp)}, f)
        os.replace(meta_tmp, base + ".json")
        os.replace(tmp, base + ".npy")  # atomic: a crash mid-decode never leaves a half cache
    except (OSError, ValueError, KeyboardInterrupt) as e:
        for path in (tmp, tmp.replace(".tmp.npy", ".compact.tmp.npy"), meta_tmp, base + ".json"):
            with contextlib.suppress(OSError):
                os.remove(path)
        if isinstance(e, KeyboardInterrupt):
            raise SystemExit(f"\ninterrupted while decoding {listing.name}: nothing was cached "
                             "and nothing trained; the same command decodes it again") from None
        if isinstance(e, ValueError):
            raise
        raise ValueError(f"cannot write the decode cache in --cache-dir {cache_dir} "
                         f"({e.strerror or e}; {format_bytes(shutil.disk_usage(cache_dir).free)} "
                         "free): free some space or pass another --cache-dir") from None
    if max_bytes is not None:
        prune_cache(cache_dir, max_bytes, keep=base, log=log)
    images = np.load(base + ".npy", mmap_mode="r")
    log(f"{listing.name}: decoded {len(kept)} images, short side <= {short_side} px, canvas "
        f"{images.shape[-1]} px, {format_bytes(images.nbytes)} in {time.time() - t0:.1f} s, "
        f"cached at {base}.npy")
    return images, np.asarray(sizes, dtype=np.int64), kept
