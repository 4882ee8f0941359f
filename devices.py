"""How a run runs, decided once for every stage: device, precision and channels_last (Runtime),
several processes (torchrun), the step as a CUDA graph (GraphedStep), and evaluation on centre views
shared out over the processes. S3L (Cao & Wu 2021, arXiv 2103.13559) trains small networks at small
resolution, so a step is short and what surrounds it shows.
"""
import contextlib
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import augment


def torchrun_ranks():
    """(rank, local rank, world size, local world size) set by torchrun, or None outside it."""
    if not all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return None
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    return tuple(int(os.environ.get(key, 1)) for key in keys)


def world_size() -> int:
    """The processes of this run: WORLD_SIZE under torchrun, else 1."""
    return (torchrun_ranks() or (0, 0, 1, 1))[2]


def joined() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def torchrun_scope():
    """Around a whole command under torchrun: only rank 0 prints (errors still reach stderr), and
    the process group is left at the end, on errors too."""
    ranks = torchrun_ranks()
    if ranks is None:
        yield
        return
    quiet = ranks[0] != 0
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null if quiet else sys.stdout):
        try:
            yield
        finally:
            if joined():
                dist.destroy_process_group()


def decode_wait_group(timeout: datetime.timedelta):
    """A gloo group of every process with its own timeout, for local_rank_0_first: on NCCL's group
    a wait for a long decode would end the run after its 10-minute watchdog."""
    return dist.new_group(backend="gloo", timeout=timeout)


@contextlib.contextmanager
def local_rank_0_first(group=None):
    """The block runs on each node's local rank 0 first (decoding into a cache), then on the
    node's other processes (reading it), which wait in a barrier of `group`."""
    ranks = torchrun_ranks() if joined() else None
    local_rank = ranks[1] if ranks else None
    if local_rank:
        dist.barrier(group=group)
    yield
    if local_rank == 0:
        dist.barrier(group=group)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers on every process: each updates its BN statistics with its own share (DDP
    broadcasts at the next forward only), and evaluation must use what rank 0's checkpoint holds."""
    if joined():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the processes of torch.distributed's default group; x itself without one."""
    if not joined():
        return x
    x = x.clone()
    dist.all_reduce(x)  # the sum
    return x / dist.get_world_size()


@dataclass(frozen=True)
class Runtime:
    """How every loop of train.py runs, made once by setup_device: the device, the autocast
    dtype and channels_last, with the reason; under torchrun, this process's place in the group."""
    device: torch.device
    amp_dtype: torch.dtype  # None: fp32
    channels_last: bool
    reason: str
    resample_dtype: torch.dtype = torch.float32  # the views' crop + resize (augment.crop_resize)
    fold_bn: bool = False  # per-GPU BN in one kernel a layer (s3l.fold_split_batchnorm_): CUDA
    distributed: bool = False  # launched by torchrun: a process group, DDP (see above)
    rank: int = 0
    local_rank: int = 0  # the process's index on its node, and its GPU
    world_size: int = 1
    local_world_size: int = 1  # processes on this node
    decode_wait: object = None  # torchrun: the gloo group waiting for a decode (decode_wait_group)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes the run folder."""
        return self.rank == 0

    def precision_cause(self) -> str:
        """The precision, as one of a failed run's likely causes (the errors that list them)."""
        fp16 = " (fp16 overflows: try --amp bf16 or off)" if self.amp_dtype == torch.float16 else ""
        return self.reason.split(":")[0] + fp16

    def local_rank_0_first(self):
        """A context: each node's first process decodes a split first, the others wait for it
        (local_rank_0_first), as long as --decode-timeout allows."""
        return local_rank_0_first(self.decode_wait)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the model wants it: NHWC when channels_last."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def place(self, module: torch.nn.Module, sync_bn: bool = False) -> torch.nn.Module:
        """The module on the device; sync_bn: its BatchNorms as SyncBatchNorm (torchrun only)."""
        if sync_bn:
            module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        return module.to(self.device, memory_format=fmt)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What the training step calls: under torchrun, DDP around `module`; else `module`. Keep
        `module` itself for state_dict() (no `module.` prefixes) and for evaluation."""
        if not self.distributed:
            return module
        device_ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def share(self, batch):
        """This process's rows of a global batch (a tensor (B, ...), or a dict or tuple of them):
        one of world_size contiguous slices, as even as possible, in rank order."""
        if self.world_size == 1:
            return batch
        if isinstance(batch, dict):
            return {key: self.share(value) for key, value in batch.items()}
        if isinstance(batch, tuple):
            return tuple(self.share(value) for value in batch)
        return batch.tensor_split(self.world_size)[self.rank]

    def sgd(self, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
        """SGD with weight decay on every parameter (as the official code), one fused kernel: on
        CPU 11x faster than foreach for ResNet-18 (5 vs 62 ms a step, measured)."""
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               fused=True)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def setup_device(device: str = "auto", amp: str = "auto", channels_last: bool = True,
                 tf32: bool = True, decode_timeout_min: float = 360.0) -> Runtime:
    """Device and autocast dtype, with the reason. CPU: fp32 (autocast is slower on most CPUs).

    CUDA: bf16 only from compute capability 8.0 (Ampere): torch.cuda.is_bf16_supported() is also
    true on older GPUs, where bf16 is emulated and convolutions are very slow; fp16 there.
    Under torchrun: GPU LOCAL_RANK, and the process group joined (NCCL on GPUs, else Gloo), with
    a gloo group that waits up to decode_timeout_min for a node's first process to decode a split.
    """
    ranks = torchrun_ranks()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if ranks and device.type == "cuda":  # one GPU per process
        if device.index not in (None, ranks[1]):
            raise SystemExit(f"--device {device}: under torchrun each process takes the GPU of "
                             "its LOCAL_RANK; pass --device cuda or auto")
        device = torch.device("cuda", ranks[1])
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU: use cpu")
        if device.index is not None:
            torch.cuda.set_device(device)  # the current device: NCCL's, and random_states's
        cap = torch.cuda.get_device_capability(device)
        torch.backends.cudnn.benchmark = True  # the same shapes every step: pick the fastest conv
        tf32 = tf32 and cap >= (8, 0)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        if amp == "auto":
            amp = "bf16" if cap >= (8, 0) else "fp16"
        name = f"CUDA {torch.cuda.get_device_name(device)}, SM {cap[0]}.{cap[1]}" + \
            (", tf32" if tf32 else "")
        fast_bf16 = cap >= (8, 0)
    else:
        if amp == "fp16":  # fp16 autocast on CPU was seen to give NaN losses from epoch 1
            raise SystemExit("--amp fp16 needs a CUDA GPU; on a CPU use --amp bf16 or off")
        amp = "off" if amp == "auto" else amp
        name = f"CPU, {torch.get_num_threads()} threads"
        fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    # bf16 crops: exact uint8 inputs, views within 2/255 of fp32, 2x faster (augment.crop_resize)
    resample = torch.bfloat16 if fast_bf16 else torch.float32
    reason = f"{amp if dtype else 'fp32'}: {name}" + (", channels_last" if channels_last else "") \
        + (", bf16 crops" if fast_bf16 else "")
    fold_bn = device.type == "cuda"  # one batch_norm a layer; on a CPU the chunks are faster
    if ranks is None:
        print(f"device: {reason}")
        return Runtime(device, dtype, channels_last, reason, resample, fold_bn)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():  # the default job sets up a second runtime in the same group
        dist.init_process_group(backend)
    reason += f", {ranks[2]} processes ({backend})"
    print(f"device: {reason}")
    wait = decode_wait_group(datetime.timedelta(minutes=decode_timeout_min))
    return Runtime(device, dtype, channels_last, reason, resample, fold_bn, True, *ranks, wait)


class GraphedStep:
    """--cuda-graphs: the whole training step (forward, backward, SGD, the EMA, MoCo's queue)
    captured once as a CUDA graph, then replayed: the host launches one graph a step instead of
    some thousand kernels (BENCHMARKS.md, "CUDA graphs for the whole step").

    step(*args): the eager step (train.pretrain_step); the tensors among args are copied into the
    graph's own before each replay, the other args are the same objects every call. The first
    `warmup` calls run eagerly (SGD's momentum buffers, cuDNN's choice of algorithms), the next
    captures (a failure stops the run with its first cause), the rest replay. A replay reads only
    tensors that keep their place: the learning rate becomes a device tensor that s3l.set_lr fills
    in place, while a Python number (MoCo's m, BYOL's tau) stays the capture's. A replay overwrites
    what the last one returned: read it first. capture(fn) -> (fn's outputs, replay):
    cuda_graph_capture, or the tests' CPU stand-in.
    """

    def __init__(self, step, optimizer: torch.optim.Optimizer, warmup: int = 3, capture=None):
        self.step, self.warmup = step, warmup
        self.capture = capture or cuda_graph_capture
        self.calls, self.args, self.out, self.replay = 0, None, None, None
        for group in optimizer.param_groups:
            device = group["params"][0].device  # CUDA's kernel reads a float32 lr, the CPU's fp64
            dtype = torch.float32 if device.type == "cuda" else torch.float64
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.warmup:
            return self.step(*args)
        if self.replay is None:
            # the tensors among args become the graph's own inputs (clone keeps channels_last);
            # the others (the model, its TrainState, the Runtime) are the same objects every call
            self.args = [a.clone() if torch.is_tensor(a) else a for a in args]
            try:
                self.out, self.replay = self.capture(lambda: self.step(*self.args))
            except RuntimeError as e:
                # torch.cuda.graph's exit raises "capture invalidated" over the step's own error,
                # leaving its side stream current and its memory pool held: no eager step can
                # safely follow, so the run stops here, with the first cause
                first = e
                while first.__context__ is not None or first.__cause__ is not None:
                    first = first.__cause__ or first.__context__
                cause = (str(first).strip().splitlines() or [type(first).__name__])[0]
                raise SystemExit(f"\nerror: --cuda-graphs: the step could not be captured as a "
                                 f"CUDA graph ({type(first).__name__}: {cause[:300]}): drop "
                                 "--cuda-graphs (the eager step computes the same); nothing was "
                                 "saved for this epoch, the last checkpoint is unchanged") from None
        else:
            for static, a in zip(self.args, args):
                if torch.is_tensor(a):
                    static.copy_(a)
        self.replay()
        return self.out


def cuda_graph_capture(fn):
    """fn's work captured as a CUDA graph (nothing runs yet): returns (fn's outputs, the graph's
    replay), which runs it again on the same tensors."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


@torch.no_grad()
def centre_view_outputs(fn, store, input_size: int, runtime: Runtime,
                        batch_size: int = 256) -> torch.Tensor:
    """fn(centre views) for every image of `store`, in order: (N, ...). Under torchrun each process
    computes one share (the last padded) and every process gets all of them."""
    n, t0 = len(store), time.time()
    per = math.ceil(n / runtime.world_size)
    mine = torch.arange(runtime.rank * per, (runtime.rank + 1) * per, device=runtime.device)
    mine = mine.clamp_(max=n - 1)
    outputs = []
    for start in range(0, per, batch_size):
        images, sizes = store.batch(mine[start:start + batch_size], runtime.device)
        x = augment.center_view(images, sizes, input_size, dtype=runtime.resample_dtype)
        with runtime.autocast():
            outputs.append(fn(runtime.prepare(x)))
        if time.time() - t0 > 5:
            done = min(start + batch_size, per)
            rate = done / (time.time() - t0)
            print(f"{line_start()}centre views: {done}/{per} ({rate:.0f} img/s)",
                  end="\n" if done == per else "", flush=True)
    out = torch.cat(outputs)
    if joined():  # every process's share, in rank order
        shares = [torch.empty_like(out) for _ in range(runtime.world_size)]
        dist.all_gather(shares, out.contiguous())
        out = torch.cat(shares)
    return out[:n]


def extract_features(net, store, input_size: int, runtime: Runtime, normalize: bool = True,
                     batch_size: int = 256) -> torch.Tensor:
    """Pooled features of centre views, (N, feature_dim), BN in eval mode; L2-normalised or not."""
    was_training = net.training
    net.eval()
    feats = centre_view_outputs(lambda x: net.forward_features(x).float(), store, input_size,
                                runtime, batch_size)
    net.train(was_training)
    return F.normalize(feats, dim=1) if normalize else feats


def classify_top1(model, store, input_size: int, runtime: Runtime) -> float:
    """Top-1 (%) of a classifier on centre views of `store`."""
    model.eval()
    predicted = centre_view_outputs(lambda x: model(x).argmax(1), store, input_size, runtime)
    return 100.0 * (predicted == store.labels).sum().item() / len(store)


def line_start() -> str:
    """"\r" on a terminal (a progress line overwrites the last), else a new line (in a file "\r"
    would run an epoch's lines together)."""
    return "\r" if sys.stdout.isatty() else "\n"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs (a lock's or a temporary file's writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True
