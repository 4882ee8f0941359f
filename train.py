"""The s3l command line: every stage of the S3L pipeline (Cao & Wu 2021, arXiv 2103.13559).

  python train.py                      the default job: S3L on the built-in shapes, kNN vs untrained
  python train.py pretrain --data DIR  MoCo v2, SimCLR or BYOL at small resolution (§3.2-3.5)
  python train.py warmup-conv5 ...     small architecture: fresh conv5 on frozen SSL conv1-4 (§1.3)
  python train.py finetune ...         the whole network with mixup, 224 px by default (§3.8)
  python train.py linear | knn ...     evaluations of frozen features (§3.9)
  python train.py export CKPT OUT.pt   the backbone as a plain state_dict with torchvision names

Reading order: defaults, parser, device, data, schedule + checkpoints + logs, evaluation, models,
pretraining, supervised stages, the default job, main. Losses and methods live in s3l.py, ResNets in
models.py, readers and augmentation in data.py.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
import models
import s3l

# ----- defaults -----------------------------------------------------------------------------------

# The official S3L code's settings on CUB-200 (PAPER.md §3.2, §3.4, §3.5). A pretraining flag left
# unset takes its method's value; the resolved config is printed and saved as config.json.
METHOD_DEFAULTS = {
    "moco": dict(lr=0.03, weight_decay=1e-4, batch_size=128, epochs=200, warmup_epochs=0,
                 moco_k=4096, moco_m=0.999, moco_t=0.2, bn_batch=32),  # bn_batch: 4 GPUs x 32
    "simclr": dict(lr=0.5, weight_decay=1e-4, batch_size=512, epochs=200, warmup_epochs=10,
                   simclr_t=0.1, simclr_base_t=0.07, bn_batch=128),  # warm-up: batch > 256
    "byol": dict(lr=0.125, weight_decay=1e-4, batch_size=128, epochs=800, warmup_epochs=0,
                 byol_tau=0.99, byol_hidden_dim=4096, bn_batch=32),  # tau constant
}

# Supervised stages (PAPER.md §3.8 fine-tuning, §1.3 conv5 warm-up, §3.9 linear evaluation on target
# datasets). lr_steps: x0.1 at these epochs; None: cosine per iteration. The warm-up's milestones
# lie past its 10 epochs, so its lr is a constant 0.1, as in the official script.
STAGE_DEFAULTS = {
    "finetune": dict(epochs=120, batch_size=64, lr=0.1, weight_decay=5e-4, lr_steps=None,
                     mixup=True, input_size=224),
    "warmup-conv5": dict(epochs=10, batch_size=64, lr=0.1, weight_decay=5e-4, lr_steps=[60, 80],
                         mixup=False, input_size=224),
    "linear": dict(epochs=60, batch_size=64, lr=10.0, weight_decay=5e-4, lr_steps=[20, 40],
                   input_size=224),
}

# The default job (`python train.py`): S3L's three parts at CPU scale (32 px, ResNet-18, 2,000
# images), measured at ~4 minutes on 2 cores. SimCLR learns fastest in a few hundred steps (MoCo's
# momentum encoder and queue need longer); crop scale 0.5 keeps the shape in most crops of a 32 px
# image (measured: scale 0.2 gives +6 kNN points, 0.5 gives +16 to +22).
DEFAULT_JOB = ["pretrain", "--method", "simclr", "--arch", "resnet18", "--input-size", "32",
               "--epochs", "30", "--batch-size", "128", "--lr", "0.3", "--simclr-t", "0.2",
               "--simclr-base-t", "0.2", "--warmup-epochs", "0", "--bn-batch", "128",
               "--crop-scale", "0.5", "1.0", "--save-dir", "runs/default", "--knn-every", "0"]
BUILTIN_TRAIN, BUILTIN_TEST = 2000, 1000  # images per split of the built-in shapes


# ----- the command line ---------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` from the parser itself (never typed by hand), except for None."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="S3L: scaled-down self-supervised learning",
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command")
    p = commands.add_parser("pretrain", formatter_class=HelpFormatter,
                            help="self-supervised pretraining (MoCo v2, SimCLR, BYOL)")
    add_data_args(p)
    add_model_args(p, input_size=112, command="pretrain")
    # method: a flag left unset takes its method's value in METHOD_DEFAULTS
    p.add_argument("--method", choices=sorted(s3l.METHODS), default="moco")
    p.add_argument("--dim", type=int, default=128, help="projection output dimension")
    p.add_argument("--moco-k", type=int, help="MoCo queue length K (PAPER.md §3.2: 4096 on CUB)")
    p.add_argument("--moco-m", type=float, help="MoCo key-encoder momentum")
    p.add_argument("--moco-t", type=float, help="MoCo softmax temperature")
    p.add_argument("--simclr-t", type=float, help="SimCLR NT-Xent temperature")
    p.add_argument("--simclr-base-t", type=float, help="SimCLR loss x t / base-t, as the official "
                   "SupCon code (PAPER.md §3.4); equal to --simclr-t: the plain NT-Xent")
    p.add_argument("--byol-tau", type=float, help="BYOL target EMA, constant")
    p.add_argument("--byol-hidden-dim", type=int, help="BYOL projector/predictor hidden width")
    p.add_argument("--bn-batch", type=int, help="images per BatchNorm group, emulating per-GPU BN "
                   "(PAPER.md §9.5); 0: the whole batch")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.2, 1.0],
                   help="RandomResizedCrop area range (PAPER.md §3.1)")
    p.add_argument("--solarize-p", type=float, default=0.0, help="solarisation probability (BYOL "
                   "paper's recipe; the S3L code uses none)")
    add_optim_args(p)
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up from lr 0.01, per iteration")
    p.add_argument("--init-from", help="multi-stage resolution: continue from this earlier stage's "
                   "checkpoint at the new --input-size, with a fresh optimizer and schedule")
    p.add_argument("--knn-every", type=int, default=10, help="kNN monitor every N epochs and at "
                   "the end (0: only at the end), when labels are available")
    p.add_argument("--knn-train", help="labelled folder for the kNN memory bank (default: the "
                   "train split of --data)")
    p.add_argument("--knn-val", help="labelled folder of kNN queries (default: the test split)")
    add_knn_args(p)
    add_device_args(p, save_dir="runs/pretrain")
    add_run_args(p)

    helps = {"finetune": "fine-tune the whole network with mixup (PAPER.md §3.8)",
             "warmup-conv5": "train a fresh conv5 + fc on frozen SSL conv1-4 (§1.3)",
             "linear": "linear probe on frozen features (§3.9)"}
    for name, text in helps.items():
        p = commands.add_parser(name, formatter_class=HelpFormatter, help=text)
        add_data_args(p)
        add_model_args(p, input_size=224, command=name)
        p.add_argument("--pretrained", required=name == "warmup-conv5", help="checkpoint to start "
                       "from: this project's, an export, or the official S3L/MoCo/BYOL ones")
        add_optim_args(p)
        p.add_argument("--lr-steps", type=int, nargs="*", help="epochs at which lr x0.1; none: "
                       "cosine per iteration")
        if name == "linear":
            p.add_argument("--augment", action="store_true", help="random crop + flip through "
                           "the frozen backbone each epoch, not centre-crop features computed once")
        else:
            p.add_argument("--mixup", action=argparse.BooleanOptionalAction,
                           help="mixup with one lambda per batch")
            p.add_argument("--mixup-alpha", type=float, default=1.0, help="lambda ~ Beta(a, a)")
        if name == "warmup-conv5":
            p.add_argument("--frozen-bn-eval", action="store_true", help="keep the BN layers of "
                           "the frozen conv1-4 in eval mode (the official code updates their "
                           "statistics)")
        p.add_argument("--eval-every", type=int, default=1, help="test top-1 every N epochs and at "
                       "the end")
        add_device_args(p, save_dir=f"runs/{name}")
        add_run_args(p)
        p.set_defaults(conv5=None, **STAGE_DEFAULTS[name])

    p = commands.add_parser("knn", formatter_class=HelpFormatter, help="weighted kNN top-1 of a "
                            "checkpoint's backbone (train split as memory, test split as queries)")
    add_data_args(p)
    add_model_args(p, input_size=None, command="knn")
    p.add_argument("--pretrained", help="checkpoint to evaluate (none: the untrained backbone)")
    add_knn_args(p)
    add_device_args(p, save_dir="runs/knn")
    p = commands.add_parser("export", formatter_class=HelpFormatter, help="write a checkpoint's "
                            "backbone as a plain state_dict with torchvision ResNet names, no fc")
    p.add_argument("checkpoint")
    p.add_argument("out")
    return parser


def add_data_args(p):
    p.add_argument("--data", help="dataset root (train/ + val/ or test/, or CUB-200's official "
                   "layout) or a folder of class folders or of images; default: built-in shapes")
    p.add_argument("--train-split", default="train", help="split to train on ('train+val': both)")
    p.add_argument("--test-split", help="split to evaluate on (default: val if present, else test)")
    p.add_argument("--subset", help="small data (PAPER.md §1.4), seeded by --seed: per-class=N, "
                   "total=N or classes=C,total=N of the train split; files listed in subset.txt")
    p.add_argument("--store-size", type=int, help="decoded square size in px (default: input size "
                   "x 8/7, as Resize(256) for 224 crops)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "s3l"),
                   help="where decoded splits are cached")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: one per core)")


CONV5_HELP = {  # what --no-conv5 means to each command
    "pretrain": "--no-conv5 removes layer4: S3L's small architecture",
    "finetune": "--no-conv5 leaves the checkpoint's layer4 unused: a fresh conv5 is fine-tuned "
                "(the official main.py --no-conv5 ablation)",
    "linear": "--no-conv5 evaluates conv1-4 only (default: the checkpoint's layers)",
    "knn": "--no-conv5 evaluates conv1-4 only (default: the checkpoint's layers)"}


def add_model_args(p, input_size, command):
    p.add_argument("--arch", choices=sorted(models.ARCHS), help="backbone (default: the "
                   "checkpoint's, else resnet50 as in the paper)")
    if command in CONV5_HELP:  # the warm-up always trains a fresh conv5
        p.add_argument("--conv5", action=argparse.BooleanOptionalAction, help=CONV5_HELP[command])
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 conv1 "
                   "and no max-pool, for inputs of 64 px and below")
    p.add_argument("--input-size", type=int, default=input_size, help="resolution in px (S3L "
                   "pretrains at 112 or 56 and fine-tunes at 224; kNN: the checkpoint's)")


def add_optim_args(p):
    p.add_argument("--epochs", type=int, help="passes over the training split")
    p.add_argument("--batch-size", type=int, help="images per step")
    p.add_argument("--lr", type=float, help="base learning rate, SGD")
    p.add_argument("--weight-decay", "--wd", type=float, help="on every parameter, BN included")
    p.add_argument("--momentum", type=float, default=0.9)


def add_knn_args(p):
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted kNN")
    p.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights")


def add_device_args(p, save_dir):
    p.add_argument("--save-dir", default=save_dir, help="config.json, log.jsonl, summary.json, "
                   "checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype; auto: bf16 on CUDA GPUs that have it, else fp16; CPU: off")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (measured 1.2-1.4x faster convolutions on CPU)")


def add_run_args(p):
    p.add_argument("--resume", help="checkpoint of this run to continue exactly from")
    p.add_argument("--save-every", type=int, default=20, help="numbered checkpoint every N epochs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the "
                   "augmentation (same loss to float tolerance)")
    p.add_argument("--print-freq", type=int, default=10, help="progress line (and loss read-back) "
                   "every N steps")


def resolve_defaults(args) -> argparse.Namespace:
    """Fill the flags left unset with the method's paper values (METHOD_DEFAULTS)."""
    for key, value in METHOD_DEFAULTS.get(getattr(args, "method", None), {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ----- device and precision: decided here, once ---------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype  # None: fp32
    channels_last: bool
    reason: str

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch as the model wants it: NHWC when channels_last."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        return module.to(self.device, memory_format=fmt)

    def sgd(self, params, args) -> torch.optim.SGD:
        """SGD with weight decay on every parameter (PAPER.md §9.19), as one fused kernel: on CPU
        11x faster than foreach for ResNet-18 (5 vs 62 ms a step, measured), same arithmetic."""
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay, fused=True)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)


def setup_device(device: str = "auto", amp: str = "auto", channels_last: bool = True) -> Runtime:
    """Device and autocast dtype, with the reason. CPU: fp32 (autocast is slower on most CPUs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU: use cpu")
        torch.backends.cudnn.benchmark = True  # the same shapes every step: pick the fastest conv
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        cap = torch.cuda.get_device_capability(device)
        name = f"CUDA {torch.cuda.get_device_name(device)}, SM {cap[0]}.{cap[1]}"
    else:
        amp = "off" if amp == "auto" else amp
        name = f"CPU, {torch.get_num_threads()} threads"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    reason = f"{amp if dtype else 'fp32'}: {name}" + (", channels_last" if channels_last else "")
    print(f"device: {reason}")
    return Runtime(device, dtype, channels_last, reason)


# ----- data ---------------------------------------------------------------------------------------

def store_bytes_limit(device: torch.device) -> int:
    """How much of the device a decoded split may take before it stays memory-mapped on disk."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 3
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3


def load_store(args, split: str, runtime: Runtime, root=None) -> data.ImageStore:
    """One split of --data (or `root`), decoded or read from the cache, on the training device."""
    root, size = root or args.data, args.store_size or round(args.input_size * 8 / 7)
    if size < args.input_size:
        raise SystemExit(f"--store-size {size} is smaller than --input-size {args.input_size}")
    if root is None:  # the built-in shapes: generated in seconds, never cached
        n, seed = (BUILTIN_TRAIN, 0) if split == "train" else (BUILTIN_TEST, 1)
        images, labels = data.synthetic_dataset(n, size, seed)
        return data.ImageStore(images, labels, data.SHAPES).to(runtime.device, 1 << 62)
    listing = data.list_split(root, split)
    images, kept = data.load_split(listing, size, args.cache_dir, args.workers)
    labels = None if listing.labels is None else [listing.labels[i] for i in kept]
    store = data.ImageStore(images, labels, listing.classes, [listing.paths[i] for i in kept])
    store = store.to(runtime.device, store_bytes_limit(runtime.device))
    if not isinstance(store.images, torch.Tensor):
        print(f"{listing.name}: {images.nbytes / 2**30:.1f} GiB stays memory-mapped on disk")
    return store


def load_train_store(args, runtime: Runtime) -> data.ImageStore:
    """The training split, cut to --subset (seeded); the chosen files go to SAVE_DIR/subset.txt."""
    store = load_store(args, args.train_split, runtime)
    if not args.subset:
        return store
    labels = None if store.labels is None else store.labels.tolist()
    idx = data.subset_indices(labels, args.subset, args.seed)
    os.makedirs(args.save_dir, exist_ok=True)
    with open(os.path.join(args.save_dir, "subset.txt"), "w") as f:
        f.write("".join(f"{store.paths[i] if store.paths else i}\n" for i in idx))
    print(f"--subset {args.subset}: {len(idx)} of {len(store)} images ({args.save_dir}/subset.txt)")
    return store.subset(idx)


def test_split(args) -> str:
    return args.test_split or ("test" if args.data is None else data.default_eval_split(args.data))


def labelled_splits(args, runtime: Runtime):
    """Train (after --subset) and test stores with the same class folders, or a clear error."""
    train_store, test_store = load_train_store(args, runtime), load_store(args, test_split(args),
                                                                          runtime)
    if train_store.labels is None or test_store.labels is None:
        raise SystemExit(f"{args.command} needs labels: --data must hold class folders (or CUB's "
                         "layout)")
    if train_store.classes != test_store.classes:
        missing = sorted(set(train_store.classes) - set(test_store.classes))
        extra = sorted(set(test_store.classes) - set(train_store.classes))
        raise SystemExit(f"the {test_split(args)} split of {args.data} does not have the train "
                         f"split's classes: missing {missing[:10]}, not in train {extra[:10]}")
    return train_store, test_store


# ----- schedule, checkpoints, logs ----------------------------------------------------------------

def lr_at(epoch: float, epochs: int, base_lr: float, warmup_epochs: float = 0.0, steps=None,
          warmup_from: float = 0.01) -> float:
    """Linear warm-up from `warmup_from`, then cosine to 0, base_lr (1 + cos(pi t)) / 2; or, with
    `steps`, base_lr x 0.1 at each of those epochs (the official --step-lr).

    epoch: whole for the official per-epoch cosine, fractional for a per-iteration one (§9.8).
    """
    if steps:
        return base_lr * 0.1 ** sum(epoch >= s for s in steps)
    if epoch < warmup_epochs:
        return warmup_from + (base_lr - warmup_from) * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def epoch_order(seed: int, epoch: int, n: int, generator, device) -> torch.Tensor:
    """Re-seed the epoch's random streams from (seed, epoch) and return its data order, (n,) on
    `device`: a run resumed at an epoch boundary draws exactly what the uninterrupted run drew, with
    no RNG state to carry in the checkpoint."""
    s = seed * 1_000_003 + epoch
    torch.manual_seed(s)  # the global RNG: MoCo's shuffle-BN, mixup
    generator.manual_seed(s)  # the augmentation's
    return torch.randperm(n, generator=torch.Generator().manual_seed(s)).to(device)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (temp file + rename): a crash mid-write never leaves a broken checkpoint."""
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file to CPU, or exit saying what it is and what was expected."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated zip, a pickle of code, a text file, ...
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Expected a file "
                         "written by torch.save: this project's checkpoints or exports, or the "
                         "official S3L/MoCo ones") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


class RunLog:
    """A run folder that describes itself: config.json, log.jsonl (one record per epoch), and
    summary.json."""

    def __init__(self, args, runtime: Runtime):
        os.makedirs(args.save_dir, exist_ok=True)
        self.save_dir, self.epochs = args.save_dir, getattr(args, "epochs", None)
        self.print_freq = getattr(args, "print_freq", 1)
        try:  # the commit the code came from, if it runs from a git checkout
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                    timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            commit = ""
        config = dict(vars(args), torch=torch.__version__, runtime=runtime.reason,
                      git_commit=commit)
        with open(os.path.join(args.save_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        resume = getattr(args, "resume", None)
        self.log_file = open(os.path.join(args.save_dir, "log.jsonl"), "a" if resume else "w")
        print("config: " + json.dumps({k: v for k, v in config.items() if v is not None}))

    def progress(self, epoch, step, steps, loss_sum, lr, images_done, t_epoch, images_left):
        """The live line, every --print-freq steps (reading the loss back syncs the device)."""
        if (step + 1) % self.print_freq and step + 1 != steps:
            return
        rate = images_done / (time.time() - t_epoch)
        print(f"\repoch {epoch + 1}/{self.epochs} step {step + 1}/{steps} loss "
              f"{loss_sum.item() / (step + 1):.4f} lr {lr:.4g} {rate:.0f} img/s eta "
              f"{images_left / rate / 60:.1f} min   ", end="", flush=True)

    def record(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        print("\r" + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in record.items()) + " " * 10)

    def summary(self, summary: dict) -> None:
        with open(os.path.join(self.save_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self.log_file.close()


def stage_record(args, backbone, wall_s: float, **extra) -> dict:
    """One stage of the pipeline for cost accounting (PAPER.md §9.21): what ran, how long, MACs."""
    return dict(command=args.command, input_size=args.input_size, epochs=args.epochs,
                wall_s=round(wall_s, 1), macs_per_image=models.macs(backbone, args.input_size),
                **extra)


# ----- evaluation ---------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone, store: data.ImageStore, input_size: int, runtime: Runtime,
                     normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Pooled features of centre views, (N, feature_dim), BN in eval mode; L2-normalised or not."""
    was_training, t0 = backbone.training, time.time()
    backbone.eval()
    feats = []
    for start in range(0, len(store), batch_size):
        stop = min(start + batch_size, len(store))
        idx = torch.arange(start, stop, device=runtime.device)
        x = data.center_view(data.to_float(store.batch(idx, runtime.device)), input_size)
        with runtime.autocast():
            feats.append(backbone.forward_features(runtime.prepare(x)).float())
        if time.time() - t0 > 5:
            end = "\n" if stop == len(store) else ""
            print(f"\rfeatures: {stop}/{len(store)}", end=end, flush=True)
    backbone.train(was_training)
    feats = torch.cat(feats)
    return F.normalize(feats, dim=1) if normalize else feats


def knn_eval(backbone, bank: data.ImageStore, queries: data.ImageStore, args, runtime) -> float:
    """kNN top-1 (%) of `backbone`: `bank` is the labelled memory, `queries` are classified."""
    feats = [extract_features(backbone, s, args.input_size, runtime) for s in (bank, queries)]
    return s3l.knn_top1(feats[0], bank.labels, feats[1], queries.labels, args.knn_k, args.knn_t)


@torch.no_grad()
def classify_top1(model, store: data.ImageStore, input_size: int, runtime: Runtime) -> float:
    """Top-1 (%) of a classifier on centre views of `store`."""
    model.eval()
    correct = 0
    for start in range(0, len(store), 256):
        idx = torch.arange(start, min(start + 256, len(store)), device=runtime.device)
        x = data.center_view(data.to_float(store.batch(idx, runtime.device)), input_size)
        with runtime.autocast():
            correct += (model(runtime.prepare(x)).argmax(1) == store.labels[idx]).sum().item()
    return 100.0 * correct / len(store)


# ----- models and checkpoints of any origin -------------------------------------------------------

def build_backbone(args, num_classes: int = 0) -> torch.nn.Module:
    return models.ARCHS[args.arch](num_classes, conv5=args.conv5, small_stem=args.small_stem)


def build_method(args, encoder) -> torch.nn.Module:
    """The SSL method of args.method around `encoder`, with the method's keyword names."""
    bn_splits = args.batch_size // args.bn_batch if args.bn_batch else 1
    if args.method == "moco":
        return s3l.MoCo(encoder, args.dim, args.moco_k, args.moco_m, args.moco_t, bn_splits)
    if args.method == "simclr":
        return s3l.SimCLR(encoder, args.dim, args.simclr_t, args.simclr_base_t, bn_splits)
    return s3l.BYOL(encoder, args.dim, args.byol_hidden_dim, args.byol_tau, bn_splits)


def pretrained_backbone(path: str):
    """(checkpoint, backbone state_dict with torchvision names) of a checkpoint, or (None, None).

    Ours keep the model under "model", the official ones under "state_dict"; exports are plain.
    """
    if not path:
        return None, None
    ckpt = read_checkpoint(path)
    state = ckpt["model"] if ckpt.get("format") == "s3l" else ckpt.get("state_dict", ckpt)
    backbone = s3l.backbone_state(state) if isinstance(state, dict) else {}
    if not isinstance(backbone.get("conv1.weight"), torch.Tensor):
        raise SystemExit(f"{path}: no ResNet backbone found (expected keys like conv1.weight, "
                         f"layer1.0.conv1.weight, under one of "
                         f"{', '.join(s3l.BACKBONE_PREFIXES)}); found: {', '.join(list(ckpt)[:6])}")
    return ckpt, backbone


def resolve_arch(args, state) -> None:
    """--arch, --small-stem, --conv5: the flags, else read off the checkpoint's keys and shapes,
    else the paper's (resnet50, ImageNet stem, conv5). A flag contradicting the checkpoint exits."""
    if state is None:
        args.arch = args.arch or "resnet50"
        args.small_stem, args.conv5 = bool(args.small_stem), args.conv5 is not False
        return
    arch, conv5, small_stem = s3l.infer_arch(state)
    if (args.arch or arch) != arch or args.small_stem not in (None, small_stem):
        asked = f"--arch {args.arch or arch}" + ("" if args.small_stem is None else
                                                 f" --{'' if args.small_stem else 'no-'}small-stem")
        raise SystemExit(f"the checkpoint holds a {arch} backbone (small_stem={small_stem}, "
                         f"conv5={conv5}), but {asked} was asked: drop the flag or pass a matching "
                         "checkpoint")
    args.arch, args.small_stem = arch, small_stem
    args.conv5 = conv5 if args.conv5 is None else args.conv5


def load_pretrained(model, state: dict, path: str, drop=()) -> None:
    """Load a backbone state into a ResNet; `drop`: prefixes left unused (conv5, for the warm-up
    and --no-conv5). A conv5 that is dropped or absent (small architecture) starts fresh, and a
    line says so."""
    had_conv5 = any(k.startswith("layer4.") for k in state)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}
    allow = ("fc.",) + tuple(drop)
    if model.layer4 is not None and not any(k.startswith("layer4.") for k in state):
        allow += ("layer4.",)
        why = "left unused" if had_conv5 else "not in the checkpoint (small architecture)"
        print(f"{path}: conv5 (layer4) {why}: it starts freshly initialised")
    try:
        s3l.load_backbone(model, state, allow)
    except ValueError as e:
        raise SystemExit(f"--pretrained {path}: {e}") from None


# ----- pretraining: one loop for every method -----------------------------------------------------

def check_pretrain_args(args, n_train: int) -> None:
    """User-facing checks before any work: each error names the flag and the fix."""
    if args.batch_size > n_train:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training split "
                         f"({n_train} images): lower --batch-size")
    if args.bn_batch and args.batch_size % args.bn_batch:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --bn-batch "
                         f"{args.bn_batch}")
    if args.method == "moco" and args.moco_k % args.batch_size:
        raise SystemExit(f"--moco-k {args.moco_k} is not divisible by --batch-size "
                         f"{args.batch_size} (MoCo's queue takes whole batches): change one")


def pretrain(args) -> dict:
    """Self-supervised pretraining (PAPER.md §1.1, step 1); returns the summary."""
    args = resolve_defaults(args)
    resumed = read_checkpoint(args.resume) if args.resume else None
    if resumed:  # the architecture is the checkpoint's
        args.arch, args.conv5, args.small_stem = (resumed["config"][k] for k in
                                                   ("arch", "conv5", "small_stem"))
    resolve_arch(args, None)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    train_store = load_train_store(args, runtime)
    check_pretrain_args(args, len(train_store))
    bank, queries = knn_stores(args, train_store, runtime)
    log = RunLog(args, runtime)

    torch.manual_seed(args.seed)
    method = runtime.place(build_method(args, build_backbone(args)))
    optimizer = runtime.sgd([p for p in method.parameters() if p.requires_grad], args)
    scaler = runtime.scaler()
    start_epoch, wall_before, stages = 0, 0.0, init_from(method, args) if args.init_from else []
    if resumed:
        method.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        start_epoch, wall_before = resumed["epoch"], resumed["wall_s"]
        stages = resumed["stages"][:-1]
    model = torch.compile(method) if args.compile else method  # state_dict() from `method` only
    n, bs, size = len(train_store), args.batch_size, train_store.size
    augment = data.SSLAugment(args.input_size, scale=tuple(args.crop_scale),
                              solarize_p=args.solarize_p)
    apply = torch.compile(augment.apply) if args.compile else augment.apply  # one fused graph
    generator = torch.Generator(runtime.device)

    def view(images):  # one augmented view of each image, its parameters drawn from `generator`
        return runtime.prepare(apply(images, augment.sample(len(images), size, size, generator)))

    steps = n // bs  # drop_last, as the official loaders
    macs = models.macs(method.backbone, args.input_size)
    t_start, images_seen, knn, record = time.time(), 0, None, {}
    print(f"pretraining {args.method} {args.arch} conv5={args.conv5} at {args.input_size} px on "
          f"{n} images: {steps} steps/epoch, {macs / 1e9:.3f} GMACs/image forward")
    for epoch in range(start_epoch, args.epochs):
        order = epoch_order(args.seed, epoch, n, generator, runtime.device)
        method.train()
        t_epoch, loss_sum = time.time(), torch.zeros((), device=runtime.device)
        for step in range(steps):
            # the official cosine is per epoch; the warm-up per iteration
            e = epoch + step / steps if epoch < args.warmup_epochs else epoch
            set_lr(optimizer, lr := lr_at(e, args.epochs, args.lr, args.warmup_epochs))
            images = data.to_float(train_store.batch(order[step * bs:(step + 1) * bs],
                                                     runtime.device))
            view1, view2 = view(images), view(images)
            with runtime.autocast():
                loss = model(view1, view2)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()  # read back every print_freq steps: no per-step host sync
            log.progress(epoch, step, steps, loss_sum, lr, (step + 1) * bs, t_epoch,
                         ((args.epochs - epoch) * steps - step - 1) * bs)
        images_seen += steps * bs
        epoch_s = time.time() - t_epoch
        record = dict(epoch=epoch + 1, loss=loss_sum.item() / steps, lr=lr,
                      epoch_s=round(epoch_s, 2), images_per_s=round(steps * bs / epoch_s, 1))
        last = epoch + 1 == args.epochs
        if bank is not None and (last or (args.knn_every and (epoch + 1) % args.knn_every == 0)):
            knn = knn_eval(method.backbone, bank, queries, args, runtime)
            record["knn_top1"] = round(knn, 2)
        log.record(record)
        wall = wall_before + time.time() - t_start
        if last or (epoch + 1) % args.save_every == 0:
            stage = stage_record(args, method.backbone, wall, method=args.method, images=n)
            state = dict(format="s3l", kind="pretrain", model=method.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                         epoch=epoch + 1, wall_s=wall, config=vars(args), stages=stages + [stage])
            save_checkpoint(os.path.join(args.save_dir, "checkpoint.pt"), state)  # the latest
            if (epoch + 1) % args.save_every == 0:  # and numbered ones, as the official code
                numbered = os.path.join(args.save_dir, f"checkpoint_{epoch + 1:04d}.pt")
                save_checkpoint(numbered, state)
    wall = wall_before + time.time() - t_start
    stage = stage_record(args, method.backbone, wall, method=args.method, images=n)
    summary = dict(command="pretrain", method=args.method, arch=args.arch, conv5=args.conv5,
                   input_size=args.input_size, epochs=args.epochs, final_loss=record.get("loss"),
                   knn_top1=knn, wall_s=round(wall, 1), macs_per_image=macs,
                   images_per_s=round(images_seen / max(time.time() - t_start, 1e-9), 1),
                   device=runtime.reason, checkpoint=os.path.join(args.save_dir, "checkpoint.pt"),
                   stages=stages + [stage])
    log.summary(summary)
    return summary


def knn_stores(args, train_store, runtime):
    """Memory bank and queries of the kNN monitor, or (None, None) when there are no labels."""
    if args.knn_train or args.knn_val:
        if not (args.knn_train and args.knn_val):
            raise SystemExit("--knn-train and --knn-val go together: give both labelled folders")
        bank, queries = (load_store(args, "train", runtime, root=r)
                         for r in (args.knn_train, args.knn_val))
    elif train_store.labels is None:
        return None, None
    else:
        try:
            bank, queries = train_store, load_store(args, test_split(args), runtime)
        except ValueError:
            print(f"kNN monitor off: no labelled '{test_split(args)}' split in {args.data}")
            return None, None
    if bank.labels is None or queries.labels is None or bank.classes != queries.classes:
        raise SystemExit("the kNN memory bank and queries need the same labelled class folders")
    return bank, queries


def init_from(method, args) -> list:
    """Multi-stage resolution (PAPER.md §1.2): start from an earlier stage's weights. The same
    method loads its whole state (encoders, heads, and the queue when its size matches); another
    method loads the backbone only. Returns the earlier stages, for cost accounting."""
    ckpt = read_checkpoint(args.init_from)
    if ckpt.get("format") != "s3l" or ckpt.get("kind") != "pretrain":
        raise SystemExit(f"--init-from {args.init_from} is not a pretraining checkpoint of s3l")
    state, old = ckpt["model"], ckpt["config"]
    if (old["arch"], old["conv5"], old["small_stem"]) != (args.arch, args.conv5, args.small_stem):
        raise SystemExit(f"--init-from {args.init_from} holds {old['arch']} conv5={old['conv5']} "
                         f"small_stem={old['small_stem']}, but this run builds {args.arch} "
                         f"conv5={args.conv5} small_stem={args.small_stem}")
    if old["method"] == args.method:
        if "queue" in state and state["queue"].shape != method.queue.shape:
            state = {k: v for k, v in state.items() if not k.startswith("queue")}
            print(f"--init-from: the queue of size {tuple(ckpt['model']['queue'].shape)} dropped")
        missing, unexpected = method.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("queue")]:
            raise SystemExit(f"--init-from {args.init_from}: missing {missing}, unexpected "
                             f"{unexpected}")
    else:
        s3l.load_backbone(method.backbone, s3l.backbone_state(state))
        print(f"--init-from: a {old['method']} checkpoint, so the backbone only")
    print(f"initialised from {args.init_from} ({old['input_size']} px, {len(ckpt['stages'])} "
          "earlier stage(s))")
    return ckpt["stages"]


# ----- supervised stages: one loop for fine-tuning, the conv5 warm-up and the linear probe --------

def fit(args, runtime, net, forward, params, batch_fn, n_train: int, evaluate, stages,
        bn_eval=()) -> dict:
    """Supervised training shared by finetune, warmup-conv5 and linear (PAPER.md §3.8, §1.3, §3.9).

    net: the module checkpointed; forward: inputs -> logits (net, or net.fc on cached features);
    params: what SGD trains; batch_fn(idx, generator) -> (inputs, labels) on the device; evaluate()
    -> test top-1 %; bn_eval: modules kept in eval mode. Reports the final-epoch top-1; the best
    epoch is also logged, labelled as chosen on the test split (optimistic, PAPER.md §9.1).
    """
    log = RunLog(args, runtime)
    optimizer, scaler = runtime.sgd(params, args), runtime.scaler()
    start_epoch, wall_before, best, acc = 0, 0.0, dict(test_top1=None, epoch=None), None
    if args.resume:
        ckpt = read_checkpoint(args.resume)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, wall_before, best, acc = (ckpt[k] for k in ("epoch", "wall_s", "best",
                                                                 "test_top1"))
    generator = torch.Generator(runtime.device)
    bs, mixup = args.batch_size, getattr(args, "mixup", False)
    steps = math.ceil(n_train / bs) if n_train % bs != 1 else n_train // bs  # no batch of 1 for BN
    t_start, images_seen, record = time.time(), 0, {}
    for epoch in range(start_epoch, args.epochs):
        order = epoch_order(args.seed, epoch, n_train, generator, runtime.device)
        net.train()
        for module in bn_eval:
            module.eval()
        t_epoch, loss_sum = time.time(), torch.zeros((), device=runtime.device)
        for step in range(steps):
            set_lr(optimizer, lr := lr_at(epoch + step / steps, args.epochs, args.lr,
                                          steps=args.lr_steps))
            x, y = batch_fn(order[step * bs:(step + 1) * bs], generator)
            with runtime.autocast():
                if mixup:
                    x, y_a, y_b, lam = s3l.mixup(x, y, args.mixup_alpha)
                    loss = s3l.mixup_loss(forward(x).float(), y_a, y_b, lam)
                else:
                    loss = F.cross_entropy(forward(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            images_seen += y.shape[0]
            log.progress(epoch, step, steps, loss_sum, lr, min((step + 1) * bs, n_train), t_epoch,
                         (args.epochs - epoch) * n_train - min((step + 1) * bs, n_train))
        epoch_s = time.time() - t_epoch
        record = dict(epoch=epoch + 1, loss=loss_sum.item() / steps, lr=lr,
                      epoch_s=round(epoch_s, 2), images_per_s=round(n_train / epoch_s, 1))
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % args.eval_every == 0:
            acc = evaluate()
            record["test_top1"] = round(acc, 2)
            if best["test_top1"] is None or acc > best["test_top1"]:
                best = dict(test_top1=round(acc, 2), epoch=epoch + 1)
        log.record(record)
        wall = wall_before + time.time() - t_start
        if last or (epoch + 1) % args.save_every == 0:
            save_checkpoint(os.path.join(args.save_dir, "checkpoint.pt"), dict(
                format="s3l", kind=args.command, model=net.state_dict(),
                optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1,
                wall_s=wall, best=best, test_top1=acc, config=vars(args),
                stages=stages + [stage_record(args, net, wall)]))
    wall = wall_before + time.time() - t_start
    summary = dict(command=args.command, arch=args.arch, input_size=args.input_size,
                   epochs=args.epochs, test_top1_final=acc,
                   test_top1_best_chosen_on_test=best["test_top1"], best_epoch=best["epoch"],
                   final_loss=record.get("loss"), wall_s=round(wall, 1),
                   images_per_s=round(images_seen / max(time.time() - t_start, 1e-9), 1),
                   device=runtime.reason, checkpoint=os.path.join(args.save_dir, "checkpoint.pt"),
                   stages=stages + [stage_record(args, net, wall)])
    log.summary(summary)
    print(f"{args.command}: final-epoch test top-1 {acc:.2f}% (best {best['test_top1']:.2f}% at "
          f"epoch {best['epoch']}, chosen on the test split); {wall / 60:.1f} min")
    return summary


def stage_setup(args, full_network: bool, drop=()):
    """The common start of finetune, warmup-conv5, linear and knn: the --pretrained backbone (its
    arch read off it), the device, the labelled splits, and a seeded ResNet with one output per
    class. Returns (runtime, train_store, test_store, net, the checkpoint's earlier stages)."""
    ckpt, state = pretrained_backbone(args.pretrained)
    resolve_arch(args, state)  # args.conv5: the flag, else the checkpoint's
    if state is not None and args.conv5 is False:  # --no-conv5: the checkpoint's layer4 unused
        drop = tuple(drop) + ("layer4.",)
    args.conv5 = args.conv5 or full_network  # fine-tuning and the warm-up train the full network
    if args.input_size is None:  # knn: the resolution the checkpoint was trained at
        args.input_size = (ckpt or {}).get("config", {}).get("input_size", 224)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    train_store, test_store = labelled_splits(args, runtime)
    torch.manual_seed(args.seed)
    net = build_backbone(args, num_classes=len(train_store.classes))
    if state is not None:
        load_pretrained(net, state, args.pretrained, drop)
    return runtime, train_store, test_store, net, ckpt.get("stages", []) if ckpt else []


def finetune(args) -> dict:
    """Fine-tune the whole network (PAPER.md §3.8), or, as `warmup-conv5`, train a fresh conv5 + fc
    on frozen SSL conv1-4 (the small-architecture warm-up, §1.3). No --pretrained: from scratch."""
    warmup = args.command == "warmup-conv5"
    runtime, train_store, test_store, net, stages = stage_setup(
        args, full_network=True, drop=("layer4.",) if warmup else ())
    bn_eval = []
    if warmup:  # fc N(0, 0.01) as main_freeze.py; only conv5 and fc learn
        torch.nn.init.normal_(net.fc.weight, std=0.01)
        torch.nn.init.zeros_(net.fc.bias)
        trainable = s3l.freeze_all_but_conv5(net)
        print(f"warm-up trains {len(trainable)} tensors (layer4.*, fc.*); conv1-4 are frozen")
        if args.frozen_bn_eval:
            bn_eval = [m for name, m in net.named_modules()
                       if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith("layer4")]
    net = runtime.place(net)
    model = torch.compile(net) if args.compile else net  # checkpoints from `net`: no _orig_mod.

    def batch_fn(idx, generator):
        images = data.to_float(train_store.batch(idx, runtime.device))
        x = data.finetune_train_view(images, args.input_size, generator)
        return runtime.prepare(x), train_store.labels[idx]

    params = [p for p in net.parameters() if p.requires_grad]
    return fit(args, runtime, net, model, params, batch_fn, len(train_store),
               lambda: classify_top1(model, test_store, args.input_size, runtime), stages, bn_eval)


def linear(args) -> dict:
    """Linear probe (PAPER.md §3.9): frozen backbone with BN in eval mode, fc N(0, 0.01), SGD lr 10
    with x0.1 steps. Without --augment, centre-crop features are computed once and trained on."""
    runtime, train_store, test_store, net, stages = stage_setup(args, full_network=False)
    torch.nn.init.normal_(net.fc.weight, std=0.01)
    torch.nn.init.zeros_(net.fc.bias)
    net = runtime.place(net.requires_grad_(False))
    net.fc.requires_grad_(True)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    train_feats = None if args.augment else extract_features(net, train_store, args.input_size,
                                                             runtime, normalize=False)
    test_feats = extract_features(net, test_store, args.input_size, runtime, normalize=False)

    @torch.no_grad()
    def batch_fn(idx, generator):
        if train_feats is not None:
            return train_feats[idx], train_store.labels[idx]
        x = data.finetune_train_view(data.to_float(train_store.batch(idx, runtime.device)),
                                     args.input_size, generator)
        with runtime.autocast():
            return net.forward_features(runtime.prepare(x)).float(), train_store.labels[idx]

    def evaluate():
        return 100.0 * (net.fc(test_feats).argmax(1) == test_store.labels).float().mean().item()

    summary = fit(args, runtime, net, net.fc, list(net.fc.parameters()), batch_fn,
                  len(train_store), evaluate, stages, bn_eval=[net])
    for key, value in net.state_dict().items():  # MoCo's lincls sanity check
        assert key.startswith("fc.") or torch.equal(value, frozen[key]), f"the probe changed {key}"
    return summary


def knn(args) -> dict:
    """Weighted kNN top-1 of a checkpoint's backbone, or of the untrained one (seeded)."""
    runtime, bank, queries, net, _ = stage_setup(args, full_network=False)
    log, t0 = RunLog(args, runtime), time.time()
    acc = knn_eval(runtime.place(net), bank, queries, args, runtime)
    record = dict(knn_top1=round(acc, 2), k=args.knn_k, t=args.knn_t, bank=len(bank),
                  queries=len(queries), input_size=args.input_size,
                  wall_s=round(time.time() - t0, 1))
    log.record(record)
    log.summary(dict(command="knn", pretrained=args.pretrained, arch=args.arch, conv5=args.conv5,
                     **record))
    return record


def export(args) -> None:
    """Write a checkpoint's backbone as a plain state_dict with torchvision ResNet names, no fc: it
    loads with strict=True into models.resnetXX(num_classes=0) of the same depth."""
    _, state = pretrained_backbone(args.checkpoint)
    args.arch = args.small_stem = args.conv5 = None
    resolve_arch(args, state)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        build_backbone(args).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"{args.checkpoint}: the backbone does not load into {args.arch}: {e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(args.out, state)
    print(f"wrote {len(state)} tensors of a {args.arch} backbone (conv5={args.conv5}, "
          f"small_stem={args.small_stem}) to {args.out}")


# ----- the default job ----------------------------------------------------------------------------

def default_job() -> None:
    """`python train.py`: S3L on the built-in shapes at CPU scale, then kNN top-1 (k=200, T=0.1; the
    2,000 train images as memory, 1,000 test images as queries), untrained vs pretrained."""
    t0 = time.time()
    args = build_parser().parse_args(DEFAULT_JOB)
    summary = pretrain(args)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    bank, queries = load_store(args, "train", runtime), load_store(args, "test", runtime)
    torch.manual_seed(args.seed)  # the very initialisation the pretraining started from
    before = knn_eval(runtime.place(build_backbone(args)), bank, queries, args, runtime)
    print(f"\nkNN top-1 on the built-in shapes ({len(queries)} test images, {len(data.SHAPES)} "
          f"classes, {args.arch} at {args.input_size} px, final epoch)")
    print(f"{'backbone':<34}{'kNN top-1 %':>12}")
    for name, acc in [("untrained", before),
                      (f"{args.method} pretrained, {args.epochs} epochs", summary["knn_top1"])]:
        print(f"{name:<34}{acc:>12.1f}")
    print(f"total time {time.time() - t0:.0f} s on {runtime.reason}; {summary['checkpoint']}")


# ----- main ---------------------------------------------------------------------------------------

COMMANDS = {"pretrain": pretrain, "finetune": finetune, "warmup-conv5": finetune, "linear": linear,
            "knn": knn, "export": export}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return default_job()
    args = build_parser().parse_args(argv)
    if args.command is None:
        return build_parser().print_help()
    try:
        COMMANDS[args.command](args)
    except ValueError as e:  # data errors (missing folders, a bad --subset): a message, no trace
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
