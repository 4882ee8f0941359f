"""Speed of the s3l pretraining step, measured side by side in one run (see BENCHMARKS.md).

S3L (Cao & Wu 2021, arXiv 2103.13559) saves compute by pretraining at small resolution; this checks
that our loop keeps that saving. Rows, each for the same model, batch and resolution:
  floor         forward + backward + SGD step of the method on random views already on the device
  s3l           our full step: uint8 store -> gather -> two augmented views on the device -> the
                same step
  s3l + health  the same with train.py's label-free health measures every 10 steps (health.py)
  conventional  the official code's way: JPEG decode + per-image PIL augmentation (torchvision 0.7
                semantics, written with Pillow here) in DataLoader worker processes, then the same
                step
  augment       augmentation alone, two views: our batched pipeline vs the per-image PIL one (1
                process), and what one conventional worker does per image (JPEG decode + two PIL
                views)
Columns: images/s (one image = its two views), ratio to the floor, ratio to the conventional
pipeline. After each method's s3l row, a line says how close the step is to the hardware: TFLOP/s
(2 x MACs x passes per image), as a share of the bf16 matmul rate measured in the same run, and the
kernel launches (aten ops on a CPU) and batch_norm calls per step.

  python bench.py                     ResNet-18, 64 px, batch 128, MoCo/SimCLR/BYOL
  python bench.py --data data/flowers102 --photo-size 500 375 --input-size 32
                                      the same on CUB-sized photos, at 32 px
  --profile adds torch.profiler's top operators of our full step; --compile checks compiled = eager;
  --cuda-graphs times the step captured as a CUDA graph (train.py --cuda-graphs).
"""
import argparse
import contextlib
import copy
import io
import math
import os
import random
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

import augment
import checkpoints
import cli
import data
import decode
import devices
import health
import models
import s3l
import train

METHODS = tuple(s3l.METHODS)  # moco, simclr, byol

# ----- the conventional pipeline: per-image PIL augmentation in worker processes ------------------


def pil_view(img: Image.Image, size: int, rng: random.Random) -> np.ndarray:
    """One MoCo v2 `--aug-plus` view of a PIL image, image by image as torchvision 0.7 does it:
    RandomResizedCrop -> p 0.8 ColorJitter (random op order) -> p 0.2 grey -> p 0.5 blur -> flip.
    Returns float32 (3, size, size), normalised."""
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.2, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        cw, ch, left, top = min(w, h), min(w, h), (w - min(w, h)) // 2, (h - min(w, h)) // 2
    img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.8:
        ops = [lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: ImageEnhance.Color(im).enhance(rng.uniform(0.6, 1.4)),
               lambda im: pil_shift_hue(im, rng.uniform(-0.1, 0.1))]
        rng.shuffle(ops)
        for op in ops:
            img = op(img)
    if rng.random() < 0.2:
        img = img.convert("L").convert("RGB")
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    x = np.asarray(img, dtype=np.float32) / 255.0
    mean, std = (np.array(v, np.float32) for v in (augment.IMAGENET_MEAN, augment.IMAGENET_STD))
    x = (x - mean) / std
    return x.transpose(2, 0, 1)


def pil_shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """torchvision's PIL adjust_hue: shift the H channel of HSV in uint8 arithmetic."""
    h, s, v = img.convert("HSV").split()
    hue = np.asarray(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hue = hue + np.uint8(int(shift * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


class JpegTwoViews(torch.utils.data.Dataset):
    """Decode a JPEG per item and return its two PIL-augmented views (what the official loaders
    do)."""

    def __init__(self, paths, size: int, seed: int = 0):
        self.paths, self.size, self.seed = paths, size, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        rng = random.Random(self.seed * 1_000_003 + i)
        with Image.open(self.paths[i]) as im:
            img = im.convert("RGB")
        views = [torch.from_numpy(pil_view(img, self.size, rng)) for _ in range(2)]
        return views[0], views[1]


# ----- timing -------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, n_warmup: int, n_steps: int, batch: int, device) -> float:
    """Images/s of `step()` over n_steps after n_warmup untimed ones."""
    for _ in range(n_warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync(device)
    return n_steps * batch / (time.perf_counter() - t0)


def make_method(args, name, runtime):
    """`name` built as train.py builds it, from train.py's own resolved flags (the method's paper
    defaults; the queue fitted to whole batches).

    Returns (method, model (compiled or not), train_step(view1, view2) -> (loss, outputs)):
    train.pretrain_step, or with --cuda-graphs its CUDA graph (devices.GraphedStep), as train.py
    runs it.
    """
    bs, moco_k = args.batch_size, s3l.METHOD_DEFAULTS["moco"]["moco_k"]
    flags = cli.parse_args(["pretrain", "--method", name, "--arch", args.arch, "--batch-size",
                              str(bs), "--moco-k", str(max(bs, moco_k // bs * bs))])
    torch.manual_seed(0)
    backbone = models.ARCHS[args.arch](small_stem=args.small_stem)
    fold = runtime.fold_bn if args.fold_bn is None else args.fold_bn
    method = runtime.place(s3l.fold_split_batchnorm_(train.build_method(flags, backbone), fold))
    optimizer = runtime.sgd(method.parameters(), flags.lr, flags.momentum, flags.weight_decay)
    state = checkpoints.TrainState(method, optimizer, runtime.scaler())
    model = torch.compile(method) if args.compile else method
    step_fn = devices.GraphedStep(train.pretrain_step, optimizer, warmup=max(args.warmup - 1, 1)) \
        if args.cuda_graphs else train.pretrain_step  # captured within the floor row's warm-up

    def train_step(view1, view2):
        return step_fn(model, state, runtime, view1, view2)
    return method, model, train_step


def compile_gap(method, model, views, runtime) -> float:
    """|loss(compiled) - loss(eager)| on one batch from the same state: --compile must not change
    the method (the RNG is re-seeded so MoCo's key shuffle is the same)."""
    eager = copy.deepcopy(method)
    losses = []
    for module in (eager, model):
        torch.manual_seed(0)
        with runtime.autocast():
            losses.append(float(module(*views)[0].detach()))
    return abs(losses[0] - losses[1])


def jpeg_files(args) -> list:
    """The files the conventional pipeline decodes: --data's train split (upscaled to --photo-size
    once, as JPEG q90, when asked), or generated images written as JPEG."""
    if args.data is None:
        root = os.path.join(tempfile.gettempdir(), f"s3l-bench-{args.gen_size}px")
        images, _ = data.synthetic_dataset(args.images, args.gen_size, seed=0)
        os.makedirs(root, exist_ok=True)
        paths = [os.path.join(root, f"{i:05d}.jpg") for i in range(len(images))]
        for path, img in zip(paths, images):
            if not os.path.exists(path):
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(path, quality=90)
        return paths
    paths = data.list_split(args.data, "train").paths[:args.images]
    if not args.photo_size:
        return paths
    w, h = args.photo_size
    root = os.path.join(args.cache_dir, f"bench-photos-{w}x{h}")
    os.makedirs(root, exist_ok=True)
    out = []
    for i, path in enumerate(paths):
        target = os.path.join(root, f"{i:05d}.jpg")
        if not os.path.exists(target):
            with Image.open(path) as im:
                im.convert("RGB").resize((w, h), Image.BICUBIC).save(target, quality=90)
        out.append(target)
    return out


# ----- the benchmark ------------------------------------------------------------------------------

def run(args) -> list:
    """Every row, printed as measured, then the table with the ratios."""
    runtime = devices.setup_device(args.device, args.amp, args.channels_last)
    cli.check_cuda_graphs(args, runtime)  # before any row
    print(f"{args.arch} small_stem={args.small_stem} at {args.input_size} px, batch "
          f"{args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    paths = jpeg_files(args)
    our_views = store_views(args, paths, runtime)
    rows = []
    rate = timed(our_views, args.warmup, args.steps, args.batch_size, runtime.device)
    measured(rows, "augment", "s3l batched", rate)
    rng = random.Random(0)
    pil_images = []
    for p in paths[:args.batch_size]:
        with Image.open(p) as im:
            pil_images.append(im.convert("RGB"))
    rate = timed(lambda: [pil_view(im, args.input_size, rng) for im in pil_images for _ in (0, 1)],
                 1, max(1, args.steps // 4), args.batch_size, runtime.device)
    measured(rows, "augment", "PIL per image", rate)
    items = JpegTwoViews(paths, args.input_size)
    rate = timed(lambda: [items[i] for i in range(args.batch_size)], 1, max(1, args.steps // 4),
                 args.batch_size, runtime.device)
    measured(rows, "augment", "PIL decode+aug", rate)
    for name in args.methods:
        method_rows(args, rows, name, paths, our_views, runtime)
    print_table(rows)
    return rows


def store_views(args, paths: list, runtime):
    """The files decoded into the uint8 store on the device, as train.py does; returns our_views(),
    the next batch's two views by train.pretrain_views (--compile: checked against eager)."""
    listing = data.Listing(paths, None, [], "bench")
    augmenter = augment.SSLAugment(args.input_size, resample_dtype=runtime.resample_dtype)
    short_side = decode.store_short_side(args.input_size, augmenter.scale[0])
    images, sizes, _ = decode.load_split(listing, short_side, args.cache_dir, log=lambda *a: None)
    store = data.ImageStore(images, sizes).to(runtime.device,
                                               data.store_bytes_limit(runtime.device))
    apply = torch.compile(augmenter.apply) if args.compile else augmenter.apply
    generator = torch.Generator(runtime.device).manual_seed(0)
    n, bs, dev = len(store), args.batch_size, runtime.device
    if bs > n:
        raise SystemExit(f"--batch-size {bs} is larger than the {n} images: raise --images")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).repeat(64).to(dev)
    if args.compile:  # the compiled augmentation must draw the same views as the eager one
        x, sizes = store.batch(order[:bs], dev)
        params = augmenter.sample(sizes, generator)
        gap = (apply(x, params) - augmenter.apply(x, params)).abs().max().item()
        print(f"augmentation: max |view compiled - eager| on one batch = {gap:.2e}")
    cursor = [0]

    def our_views():  # train.py's: uint8 store -> the batch's two views on the device
        start = cursor[0] % (n - bs + 1)
        cursor[0] += bs
        return train.pretrain_views(store, order[start:start + bs], augmenter, generator,
                                    runtime, apply)
    return our_views


def method_rows(args, rows: list, name: str, paths: list, our_views, runtime) -> None:
    """The floor, s3l and conventional rows of method `name` (and --profile's table)."""
    method, model, step = make_method(args, name, runtime)
    bs, dev = args.batch_size, runtime.device
    shape = (bs, 3, args.input_size, args.input_size)
    r1, r2 = (runtime.prepare(torch.randn(shape, device=dev)) for _ in range(2))
    if args.compile:
        print(f"{name}: |loss compiled - eager| on one batch = "
              f"{compile_gap(method, model, (r1, r2), runtime):.2e}")
    floor = timed(lambda: step(r1, r2), args.warmup, args.steps, bs, dev)
    measured(rows, name, "floor", floor)
    ours = timed(lambda: step(*our_views()), args.warmup, args.steps, bs, dev)
    measured(rows, name, "s3l", ours)
    hardware_line(args, name, method, ours, lambda: step(*our_views()), runtime)
    with_health = health_step(method, name, lambda: step(*our_views()), runtime)
    measured(rows, name, "s3l + health", timed(with_health, args.warmup, args.steps, bs, dev))
    loader = torch.utils.data.DataLoader(JpegTwoViews(paths, args.input_size), batch_size=bs,
                                         shuffle=True, num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0,
                                         pin_memory=dev.type == "cuda")
    # the workers start on the first request, with workers x prefetch_factor batches in flight:
    # one extra warm-up step per batch in flight, so the clock starts in the steady state, not
    # on batches made while the model was idle
    drain = args.workers * loader.prefetch_factor if args.workers else 0
    conv = timed(conventional_step(loader, step, runtime), args.warmup + drain, args.steps, bs,
                 dev)
    del loader  # stops its workers: batches still in flight would slow the next rows
    measured(rows, name, "conventional", conv)
    if args.profile and name == args.methods[0]:
        profile(lambda: step(*our_views()), runtime)


def health_step(method, name: str, step, runtime, print_freq: int = 10):
    """Our full step with train.py's label-free health (health.py) every print_freq steps, as the
    loop runs it; prints what one measurement costs next to print_freq plain steps."""
    monitor = health.HealthMonitor(name, None, print_freq, steps=10 ** 9, causes="")
    count, quiet = [0], contextlib.redirect_stdout(io.StringIO())  # no progress figure here

    def stepped():
        (loss, outputs), i = step(), count[0]
        count[0] += 1
        if monitor.due(i):
            with quiet:
                monitor.observe(0, i, outputs, loss)
    for _ in range(3):  # each kind of call warmed up
        stepped()
    sync(runtime.device)
    t0 = time.perf_counter()
    _, outputs = step()
    sync(runtime.device)
    t1 = time.perf_counter()
    with quiet:
        monitor.observe(0, 0, outputs, torch.zeros(()))
    t2 = time.perf_counter()
    print(f"  {name}: health measures {1e3 * (t2 - t1):.1f} ms every {print_freq} steps of "
          f"{1e3 * (t1 - t0):.0f} ms = {100 * (t2 - t1) / (print_freq * (t1 - t0)):.2f} % of "
          "the step", flush=True)
    return stepped


def conventional_step(loader, step, runtime):
    """A step fed by the DataLoader: its workers decode and augment while the model trains."""
    def forever():
        while True:
            yield from loader
    batches = forever()

    def conventional():
        v1, v2 = next(batches)
        step(*(runtime.prepare(v.to(runtime.device, non_blocking=True)) for v in (v1, v2)))
    return conventional


def matmul_tflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """The device's bf16 matmul rate, measured now: TFLOP/s of (n, n) @ (n, n), 2 n^3 FLOPs."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def launches_per_step(step, runtime) -> tuple:
    """(kernels, host launches, normalisations) of one step by torch.profiler (count_launches)."""
    cuda = runtime.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + \
        ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        step()
        sync(runtime.device)
    return count_launches(prof.events(), cuda)


def count_launches(events, cuda: bool) -> tuple:
    """(kernels, host launches, normalisations) among profiler events. CUDA: the device kernels,
    and the host's calls that start them (a CUDA graph starts all of its kernels with one launch,
    --cuda-graphs); CPU: aten ops, both. Normalisations: the native batch_norm calls (each encoder
    pass runs one per BN layer when folded, one per BN group and layer when chunked)."""
    if cuda:
        kernels = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
        host = sum(e.device_type == torch.autograd.DeviceType.CPU and
                   ("LaunchKernel" in e.name or "GraphLaunch" in e.name) for e in events)
    else:
        kernels = host = sum(e.name.startswith("aten::") for e in events)
    norms = sum(e.name in ("aten::native_batch_norm", "aten::_native_batch_norm_legit",
                           "aten::cudnn_batch_norm") for e in events)
    return kernels, host, norms


def hardware_line(args, name: str, method, rate: float, step, runtime) -> None:
    """How close the full step is to the hardware: TFLOP/s counted as 2 x MACs x passes per image
    (models.macs, s3l.PASSES), as a share of the bf16 matmul rate measured in this run, and the
    launches and normalisations per step."""
    macs = models.macs(models.ARCHS[args.arch](small_stem=args.small_stem), args.input_size)
    achieved = 2 * macs * s3l.PASSES[name] * rate / 1e12
    peak = matmul_tflops(runtime.device)
    bn_layers = sum(isinstance(m, s3l.SplitBatchNorm) for m in method.modules())
    kernels, host, norms = launches_per_step(step, runtime)
    folded = "folded" if any(getattr(m, "folded", False) for m in method.modules()) else "chunked"
    unit = f"kernels from {host} host launches" if runtime.device.type == "cuda" else "aten ops"
    print(f"  {name}: {achieved:.3f} TFLOP/s (2 x {macs / 1e9:.3f} GMACs x {s3l.PASSES[name]} "
          f"passes x {rate:.0f} images/s) = {100 * achieved / peak:.1f} % of the bf16 matmul rate "
          f"({peak:.2f} TFLOP/s); per step {kernels} {unit}, {norms} batch_norm calls for "
          f"{bn_layers} BN layers ({folded})", flush=True)


def profile(step, runtime, n_steps: int = 3) -> None:
    """Where a full step's time goes: torch.profiler's top operators over a few steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runtime.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(n_steps):
            step()
        sync(runtime.device)
    key = "self_cuda_time_total" if runtime.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))


def measured(rows: list, method: str, pipeline: str, rate: float) -> None:
    """Keep a row and print it at once: a run stopped by a time limit still shows what it measured
    (the table with the ratios comes at the end)."""
    rows.append((method, pipeline, rate))
    print(f"  {method:<10}{pipeline:<16}{rate:>10.1f} images/s", flush=True)


def print_table(rows) -> None:
    print(f"\n{'method':<10}{'pipeline':<16}{'images/s':>10}{'x floor':>10}{'x conventional':>16}")
    for method, pipeline, rate in rows:
        floor = next((r for m, p, r in rows if m == method and p == "floor"), None)
        conv = next((r for m, p, r in rows if m == method and p == "conventional"), None)
        if method == "augment":
            conv = next(r for m, p, r in rows if p == "PIL per image")
        print(f"{method:<10}{pipeline:<16}{rate:>10.1f}"
              + (f"{rate / floor:>10.2f}" if floor else f"{'':>10}")
              + (f"{rate / conv:>16.2f}" if conv else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=cli.HelpFormatter)
    p.add_argument("--arch", choices=sorted(models.ARCHS), default="resnet18")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 conv1, no max-pool")
    p.add_argument("--input-size", type=int, default=64, help="training resolution in px")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--data", help="an image folder (its train split); default: generated images")
    p.add_argument("--photo-size", type=int, nargs=2, metavar=("W", "H"),
                   help="upscale --data images to W x H JPEGs first (500 375: CUB-sized photos)")
    p.add_argument("--images", type=int, default=1024, help="images in the benchmark set")
    p.add_argument("--gen-size", type=int, default=128, help="size of generated JPEGs (no --data)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (conventional)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each row")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "s3l"))
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the "
                   "augmentation, and print |loss compiled - eager| on one batch")
    p.add_argument("--cuda-graphs", action="store_true", help="the step as one CUDA graph, "
                   "as train.py --cuda-graphs (one GPU, bf16 or fp32; not with --compile)")
    p.add_argument("--profile", action="store_true", help="print the top operators of our full "
                   "step (first method)")
    p.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, help="per-GPU BN in one "
                   "batch_norm a layer (the CUDA path) or one per group (the CPU's); default: the "
                   "device's")
    return p


if __name__ == "__main__":
    run(build_parser().parse_args())
