"""The s3l command line: every stage of the S3L pipeline (Cao & Wu 2021, arXiv 2103.13559; PAPER.md §1.1, §4).

  python train.py                        the default job: short S3L pretraining on the built-in shapes,
                                         then kNN top-1 of the pretrained backbone vs the untrained one
  python train.py pretrain --data DIR    MoCo v2 / SimCLR / BYOL at small resolution (PAPER.md §3.2-3.5)

Reading order: defaults -> parser -> device -> data -> schedule, checkpoints, logs -> evaluation ->
commands -> main. Losses and methods live in s3l.py, ResNets in models.py, data and augmentation in data.py.
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

# ----- defaults -------------------------------------------------------------------------------------------

# Per-method settings of the official S3L code on CUB-200 (PAPER.md §3.2, §3.4, §3.5). A flag left unset
# takes its method's value; the resolved config is printed and saved as config.json.
METHOD_DEFAULTS = {
    "moco": dict(lr=0.03, weight_decay=1e-4, batch_size=128, epochs=200, warmup_epochs=0,
                 moco_k=4096, moco_m=0.999, moco_t=0.2, bn_batch=32),  # §3.2; bn_batch: 4 GPUs x 32
    "simclr": dict(lr=0.5, weight_decay=1e-4, batch_size=512, epochs=200, warmup_epochs=10,
                   simclr_t=0.1, simclr_base_t=0.07, bn_batch=128),  # §3.4: warm-up since batch > 256
    "byol": dict(lr=0.125, weight_decay=1e-4, batch_size=128, epochs=800, warmup_epochs=0,
                 byol_tau=0.99, byol_hidden_dim=4096, bn_batch=32),  # §3.5: tau constant, dims real
}

# Supervised stages of the official code (PAPER.md §3.8 fine-tuning, §1.3 conv5 warm-up, §3.9 linear
# evaluation on target datasets). lr_steps: x0.1 at these epochs; None: cosine per iteration.
STAGE_DEFAULTS = {
    "finetune": dict(epochs=120, batch_size=64, lr=0.1, weight_decay=5e-4, lr_steps=None, mixup=True,
                     input_size=224),
    "warmup-conv5": dict(epochs=10, batch_size=64, lr=0.1, weight_decay=5e-4, mixup=False, input_size=224,
                         lr_steps=[60, 80]),  # milestones past epoch 10: lr 0.1 constant, as the code
    "linear": dict(epochs=60, batch_size=64, lr=10.0, weight_decay=5e-4, lr_steps=[20, 40], input_size=224),
}

# The default job (`python train.py`): all three S3L parts at CPU scale, measured to finish in under
# 5 minutes on 2 cores. SimCLR learns fastest in a few hundred steps (MoCo's momentum encoder and queue
# need longer); crop scale 0.5 keeps the shape in most crops of a 32 px image (0.2: +6 points, 0.5: +16-20).
DEFAULT_JOB = ["pretrain", "--method", "simclr", "--arch", "resnet18", "--input-size", "32",
               "--epochs", "30", "--batch-size", "128", "--lr", "0.3", "--simclr-t", "0.2",
               "--simclr-base-t", "0.2", "--warmup-epochs", "0", "--bn-batch", "128",
               "--crop-scale", "0.5", "1.0", "--save-dir", "runs/default", "--knn-every", "0"]
BUILTIN_TRAIN, BUILTIN_TEST = 2000, 1000  # images of the built-in shapes dataset per split


# ----- the command line -----------------------------------------------------------------------------------

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` from the parser itself (never typed by hand), except for None."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="S3L: scaled-down self-supervised learning",
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command")
    fmt = HelpFormatter
    p = commands.add_parser("pretrain", formatter_class=fmt,
                            help="self-supervised pretraining (MoCo v2, SimCLR, BYOL)")
    # data
    add_data_args(p)
    p.add_argument("--knn-train", help="labelled folder used as the kNN memory bank (default: the "
                   "labelled train split of --data)")
    p.add_argument("--knn-val", help="labelled folder of kNN queries (default: val/ or test/ of --data)")
    p.add_argument("--knn-every", type=int, default=10, help="kNN monitor every N epochs (0: at the end)")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted kNN")
    p.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights")
    # model
    add_model_args(p)
    # method; None = the method's value in METHOD_DEFAULTS
    p.add_argument("--method", choices=sorted(s3l.METHODS), default="moco")
    p.add_argument("--dim", type=int, default=128, help="projection output dimension (moco-dim)")
    p.add_argument("--moco-k", type=int, help="MoCo queue length K (PAPER.md §3.2: 4096 on CUB)")
    p.add_argument("--moco-m", type=float, help="MoCo key-encoder momentum")
    p.add_argument("--moco-t", type=float, help="MoCo softmax temperature")
    p.add_argument("--simclr-t", type=float, help="SimCLR NT-Xent temperature")
    p.add_argument("--simclr-base-t", type=float, help="SimCLR loss x t / base_t as the official SupCon "
                   "code (PAPER.md §3.4); set equal to --simclr-t for the plain NT-Xent")
    p.add_argument("--byol-tau", type=float, help="BYOL target EMA (constant)")
    p.add_argument("--byol-hidden-dim", type=int, help="BYOL projector/predictor hidden width")
    p.add_argument("--bn-batch", type=int, help="images per BatchNorm group, emulating per-GPU BN "
                   "(PAPER.md §9.5); 0 = whole batch")
    # augmentation (PAPER.md §3.1)
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.2, 1.0], help="RandomResizedCrop scale")
    p.add_argument("--solarize-p", type=float, default=0.0, help="solarisation probability (BYOL paper's "
                   "recipe; the S3L code uses none)")
    # optimisation: SGD, momentum 0.9, cosine per epoch (PAPER.md §3)
    add_optim_args(p)
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up from 0.01, per iteration")
    # S3L recipe: multi-stage resolution
    p.add_argument("--init-from", help="checkpoint of an earlier stage (e.g. 112 px) to continue "
                   "pretraining from at this --input-size: fresh optimizer and schedule")
    add_system_args(p)

    helps = {"finetune": "supervised fine-tuning of the whole network, mixup (PAPER.md §3.8)",
             "warmup-conv5": "small architecture: train a fresh conv5 + fc on frozen SSL conv1-4 (§1.3)",
             "linear": "linear probe on frozen features (§3.9)"}
    for name, text in helps.items():
        p = commands.add_parser(name, formatter_class=fmt, help=text)
        add_data_args(p)
        add_model_args(p)
        p.add_argument("--pretrained", required=name == "warmup-conv5", help="checkpoint to start from: "
                       "this project's, an export, or the official S3L/MoCo/BYOL ones (PAPER.md §8)")
        add_optim_args(p)
        p.add_argument("--lr-steps", type=int, nargs="*", help="epochs at which lr x0.1; none: cosine "
                       "per iteration")
        if name == "linear":
            p.add_argument("--augment", action="store_true", help="random crop + flip each epoch through "
                           "the frozen backbone (default: centre-crop features computed once)")
        else:
            p.add_argument("--mixup", action=argparse.BooleanOptionalAction, help="mixup, one lambda per batch")
            p.add_argument("--mixup-alpha", type=float, default=1.0, help="lambda ~ Beta(alpha, alpha)")
        if name == "warmup-conv5":
            p.add_argument("--frozen-bn-eval", action="store_true", help="keep the BN layers of frozen "
                           "conv1-4 in eval mode (the official code updates their statistics)")
        p.add_argument("--eval-every", type=int, default=1, help="test top-1 every N epochs (and the last)")
        add_system_args(p, save_dir=f"runs/{name}")
        p.set_defaults(**STAGE_DEFAULTS[name])

    p = commands.add_parser("knn", formatter_class=fmt, help="weighted kNN top-1 of a checkpoint")
    add_data_args(p)
    add_model_args(p)
    p.set_defaults(input_size=None)
    p.add_argument("--pretrained", help="checkpoint to evaluate (none: the untrained backbone)")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours")
    p.add_argument("--knn-t", type=float, default=0.1, help="temperature of the vote weights")
    p.add_argument("--save-dir", default="runs/knn")
    p.add_argument("--seed", type=int, default=0, help="subset and untrained-initialisation seed")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)

    p = commands.add_parser("export", formatter_class=fmt, help="write a checkpoint's backbone as a plain "
                            "state_dict with torchvision ResNet names (no fc)")
    p.add_argument("checkpoint")
    p.add_argument("out")
    return parser


def add_data_args(p):
    p.add_argument("--data", help="dataset root (train/ + val/ or test/, CUB-200's official layout) or a "
                   "folder of class folders or of images; default: the built-in shapes")
    p.add_argument("--train-split", default="train", help="split to train on ('train+val' joins two)")
    p.add_argument("--test-split", help="split to evaluate on (default: val, else test)")
    p.add_argument("--store-size", type=int, help="decoded square size in px (default: input-size * 8/7)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "s3l"),
                   help="where decoded splits are cached")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0: one per core)")
    p.add_argument("--subset", help="small data (PAPER.md §1.4), seeded by --seed: per-class=N, total=N "
                   "or classes=C,total=N of the train split; the chosen files go to SAVE_DIR/subset.txt")


def add_model_args(p):
    p.add_argument("--arch", choices=sorted(models.ARCHS), help="backbone (default: resnet50 as in the "
                   "paper, or the checkpoint's)")
    p.add_argument("--conv5", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-conv5 removes layer4: S3L small architecture (default: with conv5)")
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="3x3 stride-1 conv1 and no max-pool, for inputs of 64 px and below")
    p.add_argument("--input-size", type=int, default=112, help="resolution in px (S3L pretrains at 112 "
                   "or 56, fine-tunes at 224); kNN default: the checkpoint's")


def add_optim_args(p):
    p.add_argument("--epochs", type=int, help="passes over the training split")
    p.add_argument("--batch-size", type=int, help="images per step (per view)")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--weight-decay", "--wd", type=float, help="on all parameters, BN included (§9.19)")
    p.add_argument("--momentum", type=float, default=0.9)


def add_system_args(p, save_dir="runs/pretrain"):
    p.add_argument("--save-dir", default=save_dir, help="checkpoints, config.json, log.jsonl, "
                   "summary.json")
    p.add_argument("--resume", help="checkpoint to continue the same run from")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N epochs and at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype; auto: bf16 on CUDA GPUs that have it, off on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (faster convolutions on CPU and tensor cores)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (same loss)")
    p.add_argument("--print-freq", type=int, default=10, help="progress line (and loss readback) every "
                   "N steps")


def resolve_defaults(args) -> argparse.Namespace:
    """Fill flags left unset with the method's paper values (METHOD_DEFAULTS)."""
    for key, value in METHOD_DEFAULTS.get(getattr(args, "method", None), {}).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ----- device and precision: decided here, once ----------------------------------------------------------

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
        """A batch as the model wants it: on the device, NHWC when channels_last."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def setup_device(device: str = "auto", amp: str = "auto", channels_last: bool = True) -> Runtime:
    """Pick device and autocast dtype, print why. CPU: fp32 (CPU autocast is slower on most CPUs)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for, but torch sees no CUDA GPU: use --device cpu")
        torch.backends.cudnn.benchmark = True  # fixed shapes every step: let cuDNN pick the fastest conv
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        cap = torch.cuda.get_device_capability(device)
        if amp == "auto":
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        name = f"CUDA {torch.cuda.get_device_name(device)}, SM {cap[0]}.{cap[1]}"
    else:
        amp = "off" if amp == "auto" else amp
        name = f"CPU, {torch.get_num_threads()} threads"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    reason = f"{amp if dtype else 'fp32'}: {name}" + (", channels_last" if channels_last else "")
    return Runtime(device, dtype, channels_last, reason)


# ----- data -----------------------------------------------------------------------------------------------

def store_bytes_limit(device: torch.device) -> int:
    """How much of the device a decoded split may take before it stays memory-mapped on disk."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 3
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 3


def load_store(args, split: str, size: int, runtime: Runtime, root=None, log=print) -> data.ImageStore:
    """Decode (or read from cache) one split of --data at `size` px and put it on the training device."""
    root = root or args.data
    if root is None:  # the built-in shapes: generated, never cached
        n, seed = (BUILTIN_TRAIN, 0) if split == "train" else (BUILTIN_TEST, 1)
        images, labels = data.synthetic_dataset(n, size, seed)
        return data.ImageStore(images, labels, data.SHAPES).to(runtime.device, 1 << 62)
    listing = data.list_split(root, split)
    images, kept = data.load_split(listing, size, args.cache_dir, args.workers, log)
    labels = None if listing.labels is None else [listing.labels[i] for i in kept]
    store = data.ImageStore(images, labels, listing.classes, [listing.paths[i] for i in kept])
    return store.to(runtime.device, store_bytes_limit(runtime.device))


def load_train_store(args, size: int, runtime: Runtime) -> data.ImageStore:
    """The training split, cut to --subset (seeded) with the chosen files written to SAVE_DIR/subset.txt."""
    store = load_store(args, args.train_split, size, runtime)
    if not getattr(args, "subset", None):
        return store
    labels = None if store.labels is None else store.labels.tolist()
    idx = data.subset_indices(labels, args.subset, args.seed)
    os.makedirs(args.save_dir, exist_ok=True)
    with open(os.path.join(args.save_dir, "subset.txt"), "w") as f:
        f.write("".join(f"{store.paths[i] if store.paths else i}\n" for i in idx))
    print(f"--subset {args.subset}: {len(idx)} of {len(store)} images, list in {args.save_dir}/subset.txt")
    return store.subset(idx)


def store_size(args) -> int:
    size = args.store_size or round(args.input_size * 8 / 7)  # Resize(256) for a 224 crop
    if size < args.input_size:
        raise SystemExit(f"--store-size {size} is smaller than --input-size {args.input_size}")
    return size


# ----- schedule, checkpoints, logs ------------------------------------------------------------------------

def lr_at(epoch: float, epochs: int, base_lr: float, warmup_epochs: float = 0.0, steps=None,
          warmup_from: float = 0.01) -> float:
    """Linear warm-up from `warmup_from`, then cosine to 0: base_lr * (1 + cos(pi * t)) / 2; or, with
    `steps`, base_lr x 0.1 at each of those epochs (the official --step-lr).

    epoch: whole for the official per-epoch cosine, fractional for a per-iteration one (PAPER.md §9.8).
    """
    if steps:
        return base_lr * 0.1 ** sum(epoch >= s for s in steps)
    if epoch < warmup_epochs:
        return warmup_from + (base_lr - warmup_from) * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def epoch_seed(seed: int, epoch: int) -> int:
    # every epoch re-seeds its RNGs from (seed, epoch): a run resumed at an epoch boundary draws exactly
    # what the uninterrupted run drew, with no RNG state to carry in the checkpoint
    return seed * 1_000_003 + epoch


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (temp file + rename): a crash mid-write never leaves a broken checkpoint."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str) -> dict:
    """Load any checkpoint file to CPU, or exit with a message saying what it is and what was expected."""
    if not os.path.isfile(path):
        raise SystemExit(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a truncated zip, a pickle, a text file ...
        raise SystemExit(f"cannot read checkpoint {path}: {type(e).__name__}: {e}. Expected a file "
                         "written by torch.save (this project's checkpoints or exports, or the official "
                         "S3L/MoCo ones)") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class RunLog:
    """A run folder that describes itself: config.json, log.jsonl (one record per epoch), summary.json."""

    def __init__(self, save_dir: str, config: dict, runtime: Runtime, resume: bool):
        os.makedirs(save_dir, exist_ok=True)
        self.save_dir = save_dir
        config = dict(config, torch=torch.__version__, runtime=runtime.reason, git_commit=git_commit())
        with open(os.path.join(save_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        self.log_file = open(os.path.join(save_dir, "log.jsonl"), "a" if resume else "w")
        print("config: " + json.dumps({k: v for k, v in config.items() if v is not None}))

    def progress(self, epoch, epochs, step, steps, loss, lr, images_per_s, eta_s) -> None:
        print(f"\repoch {epoch + 1}/{epochs} step {step}/{steps} loss {loss:.4f} lr {lr:.4g} "
              f"{images_per_s:.0f} img/s eta {eta_s / 60:.1f} min   ", end="", flush=True)

    def record(self, record: dict) -> None:
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        print("\r" + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in record.items()) + " " * 10)

    def summary(self, summary: dict) -> None:
        with open(os.path.join(self.save_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        self.log_file.close()


# ----- evaluation -----------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone, store: data.ImageStore, input_size: int, runtime: Runtime,
                     normalize: bool = True, batch_size: int = 256) -> torch.Tensor:
    """Pooled backbone features of centre views: (N, feature_dim), L2-normalised unless told not to.
    BN in eval mode."""
    was_training, t0 = backbone.training, time.time()
    backbone.eval()
    feats = []
    for start in range(0, len(store), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(store)))
        x = data.center_view(data.to_float(store.batch(idx, runtime.device)), input_size)
        with runtime.autocast():
            feats.append(backbone.forward_features(runtime.prepare(x)).float())
        if time.time() - t0 > 5:
            print(f"\rfeatures: {idx[-1] + 1}/{len(store)}", end="", flush=True)
    if time.time() - t0 > 5:
        print()
    backbone.train(was_training)
    feats = torch.cat(feats)
    return F.normalize(feats, dim=1) if normalize else feats


def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 200, t: float = 0.1) -> float:
    """Weighted kNN top-1 in % (Wu et al. 2018, InstDisc): each of the k nearest train features votes for
    its class with weight exp(cos / t). train_feats: (N, D), test_feats: (M, D), both L2-normalised."""
    k = min(k, train_feats.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test_feats.shape[0], 1024):  # (1024, N) similarity blocks bound the memory
        sim, idx = (test_feats[start:start + 1024] @ train_feats.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return 100.0 * correct / test_feats.shape[0]


def knn_eval(backbone, bank: data.ImageStore, queries: data.ImageStore, input_size, runtime, k, t):
    """kNN top-1 (%) of `backbone`: `bank` is the labelled memory, `queries` are classified."""
    return knn_top1(extract_features(backbone, bank, input_size, runtime), bank.labels,
                    extract_features(backbone, queries, input_size, runtime), queries.labels, k, t)


# ----- building models ------------------------------------------------------------------------------------

def build_backbone(args, num_classes: int = 0) -> torch.nn.Module:
    return models.ARCHS[args.arch](num_classes, conv5=args.conv5, small_stem=args.small_stem)


def build_method(args, encoder) -> torch.nn.Module:
    """The SSL method of args.method around `encoder` (each one's constructor keywords named for its paper)."""
    bn_splits = args.batch_size // args.bn_batch if args.bn_batch else 1
    if args.method == "moco":
        return s3l.MoCo(encoder, args.dim, args.moco_k, args.moco_m, args.moco_t, bn_splits)
    if args.method == "simclr":
        return s3l.SimCLR(encoder, args.dim, args.simclr_t, args.simclr_base_t, bn_splits)
    return s3l.BYOL(encoder, args.dim, args.byol_hidden_dim, args.byol_tau, bn_splits)


def checkpoint_state(ckpt: dict, path: str) -> dict:
    """The state_dict inside a checkpoint: ours ("model"), the official ones ("state_dict"), or a plain one."""
    if ckpt.get("format") == "s3l":
        return ckpt["model"]
    if isinstance(ckpt.get("state_dict"), dict):
        return ckpt["state_dict"]
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt
    raise SystemExit(f"checkpoint {path} holds neither a state_dict nor one of this project's checkpoints "
                     f"(keys: {', '.join(list(ckpt)[:8])})")


def pretrained_backbone(path: str):
    """(checkpoint dict, backbone state_dict with torchvision names) of --pretrained, or (None, None)."""
    if not path:
        return None, None
    ckpt = read_checkpoint(path)
    state = s3l.backbone_state(checkpoint_state(ckpt, path))
    if "conv1.weight" not in state:
        raise SystemExit(f"--pretrained {path}: no ResNet backbone found (expected keys such as conv1.weight,"
                         f" layer1.0.conv1.weight under one of {', '.join(s3l.BACKBONE_PREFIXES)}); "
                         f"found: {', '.join(list(checkpoint_state(ckpt, path))[:6])}")
    return ckpt, state


def resolve_arch(args, state) -> None:
    """--arch / --small-stem / --conv5 from the flags, else read off the checkpoint's keys and shapes, else the
    paper's (resnet50, ImageNet stem, with conv5). A flag contradicting the checkpoint is an error."""
    if state is None:
        args.arch = args.arch or "resnet50"
        args.small_stem, args.conv5 = bool(args.small_stem), args.conv5 is not False
        return
    arch = "resnet50" if "layer1.0.conv3.weight" in state else \
        "resnet34" if "layer3.5.conv1.weight" in state else "resnet18"
    small_stem = state["conv1.weight"].shape[-1] == 3
    conv5 = any(k.startswith("layer4.") for k in state)
    if (args.arch or arch) != arch or (args.small_stem is not None and args.small_stem != small_stem):
        asked = f"--arch {args.arch or arch}" + ("" if args.small_stem is None else
                                                 f" --{'' if args.small_stem else 'no-'}small-stem")
        raise SystemExit(f"--pretrained holds a {arch} backbone (small_stem={small_stem}, conv5={conv5}), "
                         f"but {asked} was asked: drop the flag or pass a matching checkpoint")
    args.arch, args.small_stem = arch, small_stem
    args.conv5 = conv5 if args.conv5 is None else args.conv5


def load_pretrained(model, state: dict, path: str, drop=()) -> None:
    """Load a backbone state into a ResNet; `drop`: prefixes left freshly initialised (conv5 warm-up).
    A checkpoint without conv5 (small architecture) leaves layer4 fresh, and says so."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(drop))}
    allow = ("fc.",) + tuple(drop)
    if model.layer4 is not None and not any(k.startswith("layer4.") for k in state) and not drop:
        allow += ("layer4.",)
        print(f"{path} has no conv5 (small architecture): layer4 starts fresh, without warm-up")
    try:
        s3l.load_backbone(model, state, allow)
    except ValueError as e:
        raise SystemExit(f"--pretrained {path}: {e}") from None


def check_pretrain_args(args, n_train: int) -> None:
    """User-facing checks before any work: each error names the flag and the fix."""
    if args.batch_size > n_train:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training split "
                         f"({n_train} images): lower --batch-size")
    if args.bn_batch and args.batch_size % args.bn_batch:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of --bn-batch {args.bn_batch}")
    if args.method == "moco" and args.moco_k % args.batch_size:
        raise SystemExit(f"--moco-k {args.moco_k} is not divisible by --batch-size {args.batch_size} "
                         "(MoCo's queue takes whole batches): change one of them")


# ----- pretrain: the loop shared by every method ----------------------------------------------------------

def pretrain(args) -> dict:
    """Self-supervised pretraining (PAPER.md §1.1 step 1). Returns the summary dict."""
    args = resolve_defaults(args)
    if args.resume:
        resumed = read_checkpoint(args.resume)
        args.arch, args.conv5, args.small_stem = (resumed["config"][k] for k in ("arch", "conv5",
                                                                                "small_stem"))
    args.arch = args.arch or "resnet50"
    args.conv5 = True if args.conv5 is None else args.conv5
    args.small_stem = bool(args.small_stem)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    print(f"device: {runtime.reason}")
    size = store_size(args)
    train_store = load_train_store(args, size, runtime)
    check_pretrain_args(args, len(train_store))
    bank, queries = knn_stores(args, train_store, size, runtime)
    log = RunLog(args.save_dir, vars(args), runtime, resume=bool(args.resume))

    torch.manual_seed(args.seed)
    method = build_method(args, build_backbone(args)).to(runtime.device)
    if runtime.channels_last:
        method = method.to(memory_format=torch.channels_last)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=True)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    start_epoch, wall_before, stages = 0, 0.0, []
    if args.init_from:
        stages = init_from(method, args)
    if args.resume:
        method.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scaler.load_state_dict(resumed["scaler"])
        start_epoch, wall_before, stages = resumed["epoch"], resumed["wall_s"], resumed["stages"][:-1]
    model = torch.compile(method) if args.compile else method  # state_dict() always from `method`
    augment = data.SSLAugment(args.input_size, scale=tuple(args.crop_scale), solarize_p=args.solarize_p)
    generator = torch.Generator(runtime.device)
    n, bs = len(train_store), args.batch_size
    steps = n // bs  # drop_last, as the official loaders
    macs = models.macs(method.backbone, args.input_size)
    t_start, images_seen, knn = time.time(), 0, None
    print(f"pretraining {args.method} {args.arch} conv5={args.conv5} at {args.input_size} px on {n} "
          f"images: {steps} steps/epoch, {macs / 1e9:.3f} GMACs/image forward")

    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(epoch_seed(args.seed, epoch))  # MoCo's shuffle-BN draws from the global RNG
        generator.manual_seed(epoch_seed(args.seed, epoch))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(args.seed, epoch)))
        method.train()
        t_epoch, loss_sum = time.time(), torch.zeros((), device=runtime.device)
        for step in range(steps):
            # per-epoch cosine (official), per-iteration during warm-up
            e = epoch + step / steps if epoch < args.warmup_epochs else epoch
            lr = lr_at(e, args.epochs, args.lr, args.warmup_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = data.to_float(train_store.batch(order[step * bs:(step + 1) * bs], runtime.device))
            view1 = runtime.prepare(augment(images, generator))
            view2 = runtime.prepare(augment(images, generator))
            with runtime.autocast():
                loss = model(view1, view2)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()  # read back only every print_freq steps: no per-step host sync
            if (step + 1) % args.print_freq == 0 or step + 1 == steps:
                rate = (step + 1) * bs / (time.time() - t_epoch)
                eta = ((args.epochs - epoch) * steps - step - 1) * bs / rate
                log.progress(epoch, args.epochs, step + 1, steps, loss_sum.item() / (step + 1), lr, rate, eta)
        images_seen += steps * bs
        epoch_s = time.time() - t_epoch
        record = dict(epoch=epoch + 1, loss=loss_sum.item() / steps, lr=lr, epoch_s=round(epoch_s, 2),
                      images_per_s=round(steps * bs / epoch_s, 1))
        last = epoch + 1 == args.epochs
        if bank is not None and (last or (args.knn_every and (epoch + 1) % args.knn_every == 0)):
            knn = knn_eval(method.backbone, bank, queries, args.input_size, runtime, args.knn_k, args.knn_t)
            record["knn_top1"] = round(knn, 2)
        log.record(record)
        wall = wall_before + time.time() - t_start
        if last or (epoch + 1) % args.save_every == 0:
            stage = dict(command="pretrain", method=args.method, input_size=args.input_size,
                         epochs=args.epochs, images=n, wall_s=round(wall, 1), macs_per_image=macs)
            state = dict(format="s3l", kind="pretrain", model=method.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1,
                         wall_s=wall, config=vars(args), stages=stages + [stage])
            save_checkpoint(os.path.join(args.save_dir, "checkpoint.pt"), state)  # the latest
            if (epoch + 1) % args.save_every == 0:  # and a numbered one, as the official code keeps
                save_checkpoint(os.path.join(args.save_dir, f"checkpoint_{epoch + 1:04d}.pt"), state)

    wall = wall_before + time.time() - t_start
    summary = dict(command="pretrain", method=args.method, arch=args.arch, conv5=args.conv5,
                   input_size=args.input_size, epochs=args.epochs, final_loss=record["loss"] if
                   args.epochs > start_epoch else None, knn_top1=knn, wall_s=round(wall, 1),
                   images_per_s=round(images_seen / max(time.time() - t_start, 1e-9), 1),
                   macs_per_image=macs, device=runtime.reason,
                   checkpoint=os.path.join(args.save_dir, "checkpoint.pt"),
                   stages=stages + [dict(command="pretrain", input_size=args.input_size, epochs=args.epochs,
                                         wall_s=round(wall, 1), macs_per_image=macs)])
    log.summary(summary)
    return summary


def knn_stores(args, train_store, size, runtime):
    """Memory bank and queries of the kNN monitor, or (None, None) when no labels are available."""
    if args.knn_train or args.knn_val:
        if not (args.knn_train and args.knn_val):
            raise SystemExit("--knn-train and --knn-val go together: give both labelled folders")
        bank = load_store(args, "train", size, runtime, root=args.knn_train)
        queries = load_store(args, "train", size, runtime, root=args.knn_val)
    elif train_store.labels is not None:
        bank = train_store
        if args.data is None:
            queries = load_store(args, "test", size, runtime)
        else:
            split = args.test_split or data.default_eval_split(args.data)
            try:
                queries = load_store(args, split, size, runtime)
            except ValueError:
                print(f"kNN monitor off: no labelled '{split}' split in {args.data}")
                return None, None
    else:
        return None, None
    if bank.labels is None or queries.labels is None or bank.classes != queries.classes:
        raise SystemExit("the kNN memory bank and queries need the same labelled class folders")
    return bank, queries


def init_from(method, args) -> list:
    """Multi-stage resolution (PAPER.md §1.2): start from an earlier stage's weights. The same method
    loads its whole state (encoders, heads; the queue when its size matches); another method loads the
    backbone only. Returns the earlier stages, for cost accounting."""
    ckpt = read_checkpoint(args.init_from)
    if ckpt.get("format") != "s3l" or ckpt.get("kind") != "pretrain":
        raise SystemExit(f"--init-from {args.init_from} is not a pretraining checkpoint of this project")
    state, old = ckpt["model"], ckpt["config"]
    if (old["arch"], old["conv5"], old["small_stem"]) != (args.arch, args.conv5, args.small_stem):
        raise SystemExit(f"--init-from {args.init_from} holds {old['arch']} conv5={old['conv5']} "
                         f"small_stem={old['small_stem']}, but this run builds {args.arch} "
                         f"conv5={args.conv5} small_stem={args.small_stem}")
    if old["method"] == args.method:
        own = method.state_dict()
        if "queue" in state and state["queue"].shape != own["queue"].shape:
            state = {k: v for k, v in state.items() if not k.startswith("queue")}
            print(f"--init-from: queue of size {tuple(ckpt['model']['queue'].shape)} dropped")
        missing, unexpected = method.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("queue")]:
            raise SystemExit(f"--init-from {args.init_from}: missing {missing}, unexpected {unexpected}")
    else:
        s3l.load_backbone(method.backbone, s3l.backbone_state(state), allow_missing=("fc.",))
        print(f"--init-from: {old['method']} checkpoint, backbone only")
    print(f"initialised from {args.init_from} ({old['input_size']} px, {len(ckpt['stages'])} stage(s))")
    return ckpt["stages"]


# ----- supervised stages: one loop for fine-tuning, conv5 warm-up and the linear probe ---------------------

def fit(args, runtime, net, forward, params, batch_fn, n_train: int, evaluate, stages, bn_eval=()) -> dict:
    """Supervised training shared by finetune, warmup-conv5 and linear (PAPER.md §3.8, §1.3, §3.9).

    net: the module checkpointed; forward: inputs -> logits (net, or net.fc on cached features); params:
    what SGD trains; batch_fn(idx, generator) -> (inputs, labels) on the device; evaluate() -> test top-1 %;
    bn_eval: modules kept in eval mode. Reports the final-epoch top-1; the best epoch is also logged,
    labelled as chosen on the test split (optimistic, PAPER.md §9.1).
    """
    log = RunLog(args.save_dir, vars(args), runtime, resume=bool(args.resume))
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=True)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    start_epoch, wall_before, best, acc = 0, 0.0, dict(test_top1=None, epoch=None), None
    if args.resume:
        ckpt = read_checkpoint(args.resume)
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, wall_before, best, acc = ckpt["epoch"], ckpt["wall_s"], ckpt["best"], ckpt["test_top1"]
    generator = torch.Generator(runtime.device)
    bs, mixup = args.batch_size, getattr(args, "mixup", False)
    steps = math.ceil(n_train / bs) if n_train % bs != 1 else n_train // bs  # BN cannot take a batch of 1
    t_start, images_seen, record = time.time(), 0, {}
    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(epoch_seed(args.seed, epoch))  # mixup's lambda and permutation
        generator.manual_seed(epoch_seed(args.seed, epoch))
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(epoch_seed(args.seed, epoch)))
        net.train()
        for module in bn_eval:
            module.eval()
        t_epoch, loss_sum = time.time(), torch.zeros((), device=runtime.device)
        for step in range(steps):
            lr = lr_at(epoch + step / steps, args.epochs, args.lr, steps=args.lr_steps)  # per iteration
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch_fn(order[step * bs:(step + 1) * bs].to(runtime.device), generator)
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
            if (step + 1) % args.print_freq == 0 or step + 1 == steps:
                rate = min((step + 1) * bs, n_train) / (time.time() - t_epoch)
                eta = ((args.epochs - epoch) * n_train - (step + 1) * bs) / rate
                log.progress(epoch, args.epochs, step + 1, steps, loss_sum.item() / (step + 1), lr, rate, eta)
        epoch_s = time.time() - t_epoch
        record = dict(epoch=epoch + 1, loss=loss_sum.item() / steps, lr=lr, epoch_s=round(epoch_s, 2),
                      images_per_s=round(n_train / epoch_s, 1))
        last = epoch + 1 == args.epochs
        if last or (epoch + 1) % args.eval_every == 0:
            acc = evaluate()
            record["test_top1"] = round(acc, 2)
            if best["test_top1"] is None or acc > best["test_top1"]:
                best = dict(test_top1=round(acc, 2), epoch=epoch + 1)
        log.record(record)
        wall = wall_before + time.time() - t_start
        if last or (epoch + 1) % args.save_every == 0:
            state = dict(format="s3l", kind=args.command, model=net.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), epoch=epoch + 1,
                         wall_s=wall, best=best, test_top1=acc, config=vars(args),
                         stages=stages + [stage_record(args, net, wall)])
            save_checkpoint(os.path.join(args.save_dir, "checkpoint.pt"), state)
    wall = wall_before + time.time() - t_start
    summary = dict(command=args.command, arch=args.arch, input_size=args.input_size, epochs=args.epochs,
                   test_top1_final=acc, test_top1_best_chosen_on_test=best["test_top1"],
                   best_epoch=best["epoch"], final_loss=record.get("loss"), wall_s=round(wall, 1),
                   images_per_s=round(images_seen / max(time.time() - t_start, 1e-9), 1),
                   device=runtime.reason, checkpoint=os.path.join(args.save_dir, "checkpoint.pt"),
                   stages=stages + [stage_record(args, net, wall)])
    log.summary(summary)
    print(f"{args.command}: final-epoch test top-1 {acc:.2f}% (best {best['test_top1']:.2f}% at epoch "
          f"{best['epoch']}, chosen on the test split); {wall / 60:.1f} min")
    return summary


def stage_record(args, net, wall_s) -> dict:
    """One stage of the pipeline for cost accounting (PAPER.md §9.21): what ran, how long, at what MACs."""
    return dict(command=args.command, input_size=args.input_size, epochs=args.epochs, wall_s=round(wall_s, 1),
                macs_per_image=models.macs(net, args.input_size))


def labelled_splits(args, size: int, runtime: Runtime):
    """Train (after --subset) and test stores with the same class folders, or a clear error."""
    train_store = load_train_store(args, size, runtime)
    split = args.test_split or ("test" if args.data is None else data.default_eval_split(args.data))
    test_store = load_store(args, split, size, runtime)
    if train_store.labels is None or test_store.labels is None:
        raise SystemExit(f"{args.command} needs labels: --data must hold class folders (or CUB's layout)")
    if train_store.classes != test_store.classes:
        missing = sorted(set(train_store.classes) - set(test_store.classes))
        extra = sorted(set(test_store.classes) - set(train_store.classes))
        raise SystemExit(f"the {split} split of {args.data} does not have the train split's classes: "
                         f"missing {missing[:10]}, not in train {extra[:10]}")
    return train_store, test_store


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


def finetune(args) -> dict:
    """Fine-tune the whole network (PAPER.md §3.8), or, as `warmup-conv5`, train a fresh conv5 + fc on
    frozen SSL conv1-4 (the small-architecture warm-up, §1.3). No --pretrained: the from-scratch baseline."""
    warmup = args.command == "warmup-conv5"
    ckpt, state = pretrained_backbone(args.pretrained)
    resolve_arch(args, state)
    args.conv5 = True  # fine-tuning and the warm-up always train the full network
    runtime = setup_device(args.device, args.amp, args.channels_last)
    print(f"device: {runtime.reason}")
    train_store, test_store = labelled_splits(args, store_size(args), runtime)
    torch.manual_seed(args.seed)
    net = build_backbone(args, num_classes=len(train_store.classes))
    if state is not None:
        load_pretrained(net, state, args.pretrained, drop=("layer4.",) if warmup else ())
    bn_eval = []
    if warmup:  # fc N(0, 0.01) as main_freeze.py; only conv5 and fc learn
        torch.nn.init.normal_(net.fc.weight, std=0.01)
        torch.nn.init.zeros_(net.fc.bias)
        trainable = s3l.freeze_all_but_conv5(net)
        print(f"warm-up trains {len(trainable)} tensors: layer4.* and fc.*; conv1-4 frozen")
        if args.frozen_bn_eval:
            bn_eval = [m for name, m in net.named_modules()
                       if isinstance(m, torch.nn.BatchNorm2d) and not name.startswith("layer4")]
    net = net.to(runtime.device, memory_format=torch.channels_last if runtime.channels_last else
                 torch.preserve_format)
    model = torch.compile(net) if args.compile else net  # checkpoints from `net`: no _orig_mod. prefix

    def batch_fn(idx, generator):
        images = data.to_float(train_store.batch(idx, runtime.device))
        x = data.finetune_train_view(images, args.input_size, generator)
        return runtime.prepare(x), train_store.labels[idx]

    params = [p for p in net.parameters() if p.requires_grad]
    stages = ckpt.get("stages", []) if ckpt else []
    return fit(args, runtime, net, model, params, batch_fn, len(train_store),
               lambda: classify_top1(model, test_store, args.input_size, runtime), stages, bn_eval)


def linear(args) -> dict:
    """Linear probe (PAPER.md §3.9): frozen backbone with BN in eval mode, fc N(0, 0.01), SGD lr 10 with
    x0.1 steps. Without --augment the centre-crop features are computed once and the probe trains on them."""
    ckpt, state = pretrained_backbone(args.pretrained)
    resolve_arch(args, state)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    print(f"device: {runtime.reason}")
    train_store, test_store = labelled_splits(args, store_size(args), runtime)
    torch.manual_seed(args.seed)
    net = build_backbone(args, num_classes=len(train_store.classes))
    if state is not None:
        load_pretrained(net, state, args.pretrained)
    torch.nn.init.normal_(net.fc.weight, std=0.01)
    torch.nn.init.zeros_(net.fc.bias)
    net.requires_grad_(False).fc.requires_grad_(True)
    net = net.to(runtime.device, memory_format=torch.channels_last if runtime.channels_last else
                 torch.preserve_format)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    train_feats = None if args.augment else extract_features(net, train_store, args.input_size, runtime,
                                                             normalize=False)
    test_feats = extract_features(net, test_store, args.input_size, runtime, normalize=False)

    @torch.no_grad()
    def batch_fn(idx, generator):
        if train_feats is not None:
            return train_feats[idx], train_store.labels[idx]
        x = data.finetune_train_view(data.to_float(train_store.batch(idx, runtime.device)), args.input_size,
                                     generator)
        with runtime.autocast():
            return net.forward_features(runtime.prepare(x)).float(), train_store.labels[idx]

    def evaluate():
        return 100.0 * (net.fc(test_feats).argmax(1) == test_store.labels).float().mean().item()

    stages = ckpt.get("stages", []) if ckpt else []
    summary = fit(args, runtime, net, net.fc, list(net.fc.parameters()), batch_fn, len(train_store), evaluate,
                  stages, bn_eval=[net])
    for key, value in net.state_dict().items():  # MoCo's lincls sanity check: the backbone never moved
        assert key.startswith("fc.") or torch.equal(value, frozen[key]), f"linear probe changed {key}"
    return summary


def knn(args) -> dict:
    """Weighted kNN top-1 of a checkpoint's backbone (or the untrained one): train split as memory bank,
    test split as queries."""
    ckpt, state = pretrained_backbone(args.pretrained)
    resolve_arch(args, state)
    if args.input_size is None:
        args.input_size = (ckpt or {}).get("config", {}).get("input_size", 224)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    bank, queries = labelled_splits(args, store_size(args), runtime)
    torch.manual_seed(args.seed)
    backbone = build_backbone(args)
    if state is not None:
        load_pretrained(backbone, state, args.pretrained)
    backbone = backbone.to(runtime.device)
    t0 = time.time()
    acc = knn_eval(backbone, bank, queries, args.input_size, runtime, args.knn_k, args.knn_t)
    args.resume = None
    log = RunLog(args.save_dir, vars(args), runtime, resume=False)
    record = dict(knn_top1=round(acc, 2), k=args.knn_k, t=args.knn_t, bank=len(bank), queries=len(queries),
                  input_size=args.input_size, wall_s=round(time.time() - t0, 1))
    log.record(record)
    summary = dict(command="knn", pretrained=args.pretrained, arch=args.arch, conv5=args.conv5, **record)
    log.summary(summary)
    return summary


def export(args) -> None:
    """Write a checkpoint's backbone as a plain state_dict with torchvision ResNet names and no fc: it loads
    with strict=True into models.resnetXX(num_classes=0) of the same depth, or torchvision's minus its fc."""
    ckpt, state = pretrained_backbone(args.checkpoint)
    args.arch = args.small_stem = args.conv5 = None
    resolve_arch(args, state)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    model = build_backbone(args)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"{args.checkpoint}: the backbone does not load into {args.arch}: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_checkpoint(args.out, state)
    print(f"wrote {len(state)} tensors of a {args.arch} backbone (conv5={args.conv5}, small_stem="
          f"{args.small_stem}) to {args.out}")


# ----- the default job ------------------------------------------------------------------------------------

def default_job() -> None:
    """`python train.py`: S3L on the built-in shapes at CPU scale, then kNN top-1 (k=200, T=0.1, 2000
    labelled train images as memory, 1000 test images as queries) of the same backbone untrained vs
    pretrained, as a small table."""
    t0 = time.time()
    args = build_parser().parse_args(DEFAULT_JOB)
    summary = pretrain(args)
    runtime = setup_device(args.device, args.amp, args.channels_last)
    size = store_size(args)
    bank, queries = (load_store(args, s, size, runtime) for s in ("train", "test"))
    torch.manual_seed(args.seed)  # the very initialisation the pretraining started from
    untrained = build_backbone(args).to(runtime.device)
    if runtime.channels_last:
        untrained = untrained.to(memory_format=torch.channels_last)
    before = knn_eval(untrained, bank, queries, args.input_size, runtime, args.knn_k, args.knn_t)
    rows = [("untrained", before), (f"{args.method} pretrained, {args.epochs} epochs", summary["knn_top1"])]
    print(f"\nkNN top-1 on the built-in shapes ({len(queries)} test images, {len(data.SHAPES)} classes, "
          f"{args.arch} at {args.input_size} px, final epoch)")
    print(f"{'backbone':<34}{'kNN top-1 %':>12}")
    for name, acc in rows:
        print(f"{name:<34}{acc:>12.1f}")
    print(f"total time {time.time() - t0:.0f} s on {runtime.reason}; checkpoint {summary['checkpoint']}")


# ----- main -----------------------------------------------------------------------------------------------

def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return default_job()
    args = build_parser().parse_args(argv)
    try:
        commands = {"pretrain": pretrain, "finetune": finetune, "warmup-conv5": finetune, "linear": linear,
                    "knn": knn, "export": export}
        if args.command is None:
            build_parser().print_help()
            return
        commands[args.command](args)
    except ValueError as e:  # data-side user errors (missing folders, bad --subset, ...) without a trace
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
