"""The s3l command line: every stage of S3L (Cao & Wu 2021, arXiv 2103.13559), one subcommand each.

  python train.py                      the default job: S3L on the built-in shapes, kNN vs untrained
  python train.py pretrain --data DIR  MoCo v2, SimCLR or BYOL at small resolution
  python train.py warmup-conv5 ...     small architecture: fresh conv5 on frozen SSL conv1-4
  python train.py finetune ...         the whole network with mixup, 224 px by default
  python train.py linear | knn ...     evaluations of frozen features
  python train.py export CKPT OUT.pt   the backbone as a plain state_dict with torchvision names
  python study.py --data DIR           the paper's comparisons: grids of the above (study.py)
  torchrun --nproc_per_node N train.py pretrain ...   any training command on N GPUs (DDP)

README.md's "Paper map" says which paper section and official script each stage reproduces, its
"Reading order" which functions one step runs through. Here: defaults, parser, data
from the flags, the architecture, a run's bookkeeping (runs.Run), kNN, one training step
(pretrain_step, supervised_step: what bench.py times), the pretraining loop, the supervised loop,
the default job, main. Losses, methods, mixup and the lr schedules live in s3l.py, ResNets in
models.py, the augmentation in augment.py, readers and a run's splits in data.py; the run folder
(checkpoints, resuming, interrupts) and how a run runs (device, precision, torchrun) in runs.py.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import augment
import data
import health
import models
import runs
import s3l
from runs import POSITIVE, HelpFormatter, Parser, device_name, number, subset_spec

# ----- defaults -----------------------------------------------------------------------------------

# The official S3L code's settings on CUB-200 (paper map: MoCo v2, SimCLR, BYOL). A pretraining
# flag left unset takes its method's value; the resolved config is printed and saved as config.json.
# lr: SGD (momentum 0.9) for the method's batch, no linear scaling; warm-up epochs apply only above
# WARMUP_MIN_BATCH images a batch; schedules are the official per-epoch cosine.
METHOD_DEFAULTS = {
    "moco": dict(lr=0.03, weight_decay=1e-4,  # the official moco_cub.sh, for batch 128
                 batch_size=128, bn_batch=32,  # 4 GPUs x 32 images: per-GPU BN (shuffle-BN)
                 epochs=200, warmup_epochs=0,  # the paper's CUB pretraining, no warm-up
                 moco_k=4096,  # queue length K, 32 batches (the ImageNet default 65536 is > CUB)
                 moco_m=0.999,  # key-encoder momentum: MoCo's default
                 moco_t=0.2),  # softmax temperature of MoCo v2 (v1: 0.07)
    "simclr": dict(lr=0.5, weight_decay=1e-4,  # SGD, not LARS, for batch 512
                   batch_size=512, bn_batch=128,  # 4 GPUs x 128 images
                   epochs=200, warmup_epochs=10,  # linear from lr 0.01, per iteration
                   simclr_t=0.1,  # NT-Xent temperature of the official script (SimCLR's: 0.5)
                   simclr_base_t=0.07),  # the SupCon code's loss x T / 0.07 (x1.43 at T 0.1)
    "byol": dict(lr=0.125, weight_decay=1e-4,  # for batch 128
                 batch_size=128, bn_batch=32,  # 4 GPUs x 32 images, BN per view
                 epochs=800, warmup_epochs=10,  # warm-up as SimCLR's rule: only above 256 a batch
                 byol_tau=0.99,  # target EMA, constant (no cosine ramp to 1)
                 byol_hidden_dim=4096,  # projector/predictor hidden width (output: --dim 128)
                 byol_predictor=True),  # False: BYOL's Table 5b ablation, a collapse
}
WARMUP_MIN_BATCH = 256  # images: the official code warms up only when the batch exceeds this

# Supervised stages (paper map: fine-tuning, conv5 warm-up, linear probe on target datasets).
# lr_steps: x0.1 at these epochs; None: cosine per iteration. SGD with momentum 0.9.
STAGE_DEFAULTS = {
    "finetune": dict(epochs=120, batch_size=64,  # the S3L recipe on CUB (main_train_mixup.sh)
                     lr=0.1, weight_decay=5e-4,  # for batch 64
                     random_resized_crop=False,  # Resize(256) -> RandomCrop(224) + flip
                     lr_steps=None,  # cosine per iteration, no warm-up
                     input_size=224),  # px: fine-tuning is at full resolution
    "warmup-conv5": dict(epochs=10, batch_size=64,  # main_freeze.py: conv5 + fc, 10 epochs
                         lr=0.1, weight_decay=5e-4,  # for batch 64
                         random_resized_crop=False,  # as fine-tuning
                         lr_steps=[60, 80],  # past its 10 epochs: lr stays 0.1, as the script
                         mixup=False,  # the official warm-up trains without mixup
                         input_size=224),  # px: the parser default, whatever the pretraining size
    "linear": dict(epochs=30, batch_size=64,  # the official CUB linear script
                   lr=10.0, weight_decay=5e-4,  # lr 10 on unnormalised features (MoCo lincls: 30)
                   random_resized_crop=True,  # RRC(224) + flip, as that script (with --data)
                   lr_steps=[10, 20],  # x0.1 at epochs 10 and 20
                   input_size=224),  # px
}

FINETUNE_BN_BATCH = 16  # images: batch 64 by DataParallel on 4 GPUs, BN per GPU

# The default job (`python train.py`): S3L's three parts at CPU scale (32 px, ResNet-18, 2,000
# images), measured at ~3 minutes on 2 cores. SimCLR learns fastest in a few hundred steps (MoCo's
# momentum encoder and queue need longer); crop scale 0.5 keeps the shape in most crops of a 32 px
# image (measured: scale 0.2 gives +6 kNN points, 0.5 gives +16 to +22).
DEFAULT_JOB = ["pretrain", "--method", "simclr", "--arch", "resnet18", "--input-size", "32",
               "--epochs", "30", "--batch-size", "128", "--lr", "0.3", "--simclr-t", "0.2",
               "--simclr-base-t", "0.2", "--warmup-epochs", "0", "--bn-batch", "128",
               "--crop-scale", "0.5", "1.0", "--save-dir", "runs/default", "--knn-every", "0",
               "--start-over"]  # a second `python train.py` moves the first one's files aside


# ----- the command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """One subcommand per stage of the recipe (paper map), and export."""
    parser = Parser(description="S3L: scaled-down self-supervised learning",
                    formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command")
    add_pretrain_parser(commands)
    add_supervised_parsers(commands)
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
    parser.stages = commands.choices  # {command: its parser}, for stage_flags
    return parser


def stage_flags(command: str) -> set:
    """Every flag of a train.py command, e.g. {"--lr", "--epochs", ...}: what study.py forwards."""
    return set(build_parser().stages[command].flags)


def add_pretrain_parser(commands) -> None:
    """pretrain: step 1 of the recipe, MoCo v2, SimCLR or BYOL at small resolution."""
    p = commands.add_parser("pretrain", formatter_class=HelpFormatter,
                            help="self-supervised pretraining (MoCo v2, SimCLR, BYOL)")
    add_data_args(p)
    add_model_args(p, input_size=112, command="pretrain")
    # method: a flag left unset takes its method's value in METHOD_DEFAULTS
    p.add_argument("--method", choices=sorted(s3l.METHODS), default="moco")
    p.add_argument("--dim", type=number(int, 1), default=128, help="projection output dimension")
    p.add_argument("--head", choices=sorted(s3l.HEADS), help="MoCo v2 and SimCLR projection "
                   "head: mlp, Linear-ReLU-Linear (the official S3L and MoCo v2 --mlp head, the "
                   "default); mlp-bn, Linear-BN-ReLU-Linear-BN without biases (SimCLR's own and "
                   "MoCo v3's: faster in short runs, README's head tables). BYOL's projector has "
                   "its own BN")
    p.add_argument("--moco-k", type=number(int, 1), help="MoCo queue length K (official CUB "
                   "script: 4096)")
    p.add_argument("--moco-m", type=number(float, 0, 1), help="MoCo key-encoder momentum")
    p.add_argument("--moco-t", type=POSITIVE, help="MoCo softmax temperature")
    p.add_argument("--simclr-t", type=POSITIVE, help="SimCLR NT-Xent temperature")
    p.add_argument("--simclr-base-t", type=POSITIVE, help="SimCLR loss x t / base-t, as the "
                   "official SupCon-based code; equal to --simclr-t: the plain NT-Xent")
    p.add_argument("--simclr-local-negatives", action="store_true", help="under torchrun, each "
                   "process's own 2n - 2 negatives (the official per-GPU ones), not the whole "
                   "batch's gathered from every process")
    p.add_argument("--byol-tau", type=number(float, 0, 1), help="BYOL target EMA, constant")
    p.add_argument("--byol-predictor", action=argparse.BooleanOptionalAction, help="BYOL's "
                   "predictor; --no-byol-predictor: BYOL's ablation that collapses (on purpose)")
    p.add_argument("--byol-hidden-dim", type=number(int, 1), help="BYOL projector/predictor "
                   "hidden width")
    p.add_argument("--bn-batch", type=number(int, 0), help="images per BatchNorm group, emulating "
                   "the official per-GPU BN (default: the method's group, at most the batch of a "
                   "process); 0: the whole batch of a process")
    add_sync_bn_arg(p)
    p.add_argument("--crop-scale", type=number(float, 0, 1, open_low=True), nargs=2,
                   default=[0.2, 1.0], help="RandomResizedCrop area range (MoCo v2 aug-plus)")
    p.add_argument("--blur-p", type=number(float, 0, 1), default=0.5, help="Gaussian blur "
                   "probability (MoCo v2's aug-plus; CIFAR recipes at 32 px use 0)")
    p.add_argument("--solarize-p", type=number(float, 0, 1), default=0.0,
                   help="solarisation probability (BYOL paper's recipe; the S3L code uses none)")
    add_optim_args(p)
    p.add_argument("--warmup-epochs", type=number(float, 0),
                   help="linear warm-up from lr 0.01, per iteration "
                   f"(default: 10 for SimCLR and BYOL when the batch exceeds {WARMUP_MIN_BATCH}, "
                   "else 0)")
    p.add_argument("--init-from", help="multi-stage resolution: continue from this earlier stage's "
                   "checkpoint at the new --input-size, with a fresh optimizer and schedule")
    p.add_argument("--health", action=argparse.BooleanOptionalAction, default=True, help="label-"
                   "free health every --print-freq steps (health.py: effective rank, spread, "
                   "alignment, uniformity), a collapse warning, health.png")
    p.add_argument("--knn-every", type=number(int, 0), default=10, help="kNN monitor every N "
                   "epochs and at the end (0: only at the end), when labels are available")
    p.add_argument("--knn-train", help="labelled folder for the kNN memory bank (default: the "
                   "train split of --data)")
    p.add_argument("--knn-val", help="labelled folder of kNN queries (default: the test split)")
    add_knn_args(p)
    add_device_args(p, save_dir="runs/pretrain")
    add_run_args(p)
    p.add_argument("--cuda-graphs", action="store_true", help="the step as one CUDA graph (1 GPU)")


def add_supervised_parsers(commands) -> None:
    """finetune, warmup-conv5 and linear: the supervised stages of the recipe."""
    helps = {"finetune": "fine-tune the whole network (mixup when --pretrained)",
             "warmup-conv5": "train conv5 + fc on frozen SSL conv1-4 (small architecture)",
             "linear": "linear probe on frozen features"}
    for name, text in helps.items():
        p = commands.add_parser(name, formatter_class=HelpFormatter, help=text)
        add_data_args(p)
        add_model_args(p, input_size=None, command=name)
        p.add_argument("--pretrained", required=name == "warmup-conv5", help="checkpoint to start "
                       "from: this project's, an export, or the official S3L/MoCo/BYOL ones")
        add_optim_args(p)
        p.add_argument("--lr-steps", type=number(int, 0), nargs="*", help="epochs at which lr "
                       "x0.1; none: cosine per iteration")
        p.add_argument("--random-resized-crop", action=argparse.BooleanOptionalAction,
                       help="train views by RandomResizedCrop (area 0.08-1) + flip, as the "
                       "official --random-resized-crop and CUB linear script; --no-...: Resize "
                       "(input x 8/7) -> RandomCrop + flip, the official fine-tuning (default: "
                       "on for linear with --data, else off)")
        if name == "linear":
            p.add_argument("--cached-features", action="store_true", help="train on centre-crop "
                           "features computed once (fast), not the official protocol's random "
                           "crop + flip through the frozen backbone every epoch")
        else:
            p.add_argument("--mixup", action=argparse.BooleanOptionalAction, help="mixup with one "
                           "lambda per batch (default: on with --pretrained; the official "
                           "from-scratch baseline trains without it)")
            p.add_argument("--mixup-alpha", type=POSITIVE, default=1.0, help="lambda ~ Beta(a, a)")
            p.add_argument("--bn-batch", type=number(int, 0), help="images per BatchNorm group, "
                           f"emulating the official 4 GPUs (default: {FINETUNE_BN_BATCH}, at most "
                           "a process's batch); 0: the whole batch of a process")
            add_sync_bn_arg(p)
        if name == "warmup-conv5":
            p.add_argument("--frozen-bn-eval", action="store_true", help="keep the BN layers of "
                           "the frozen conv1-4 in eval mode (the official code updates their "
                           "statistics)")
        p.add_argument("--eval-every", type=number(int, 1), default=1, help="test top-1 every N "
                       "epochs and at the end")
        add_device_args(p, save_dir=f"runs/{name}")
        add_run_args(p)
        p.set_defaults(**{k: v for k, v in STAGE_DEFAULTS[name].items()
                          if k not in ("input_size", "random_resized_crop")})  # parse_args


def add_data_args(p):
    p.add_argument("--data", help="dataset root (train/ + val/ or test/, or CUB-200's official "
                   "layout) or a folder of class folders or of images; default: built-in shapes")
    p.add_argument("--train-split", default="train", help="split to train on ('train+val': both)")
    p.add_argument("--test-split", help="split to evaluate on (default: val if present, else test)")
    p.add_argument("--subset", type=subset_spec, help="small data, seeded by --seed: per-class=N, "
                   "total=N, classes=C,total=N or fraction=F of the train split; files listed in "
                   "subset.txt")
    p.add_argument("--store-size", type=number(int, 8), help="shorter side of the decoded images "
                   "in px, trading fidelity for memory (default: pretraining input / sqrt(min "
                   "crop scale), so crops are not enlarged; other stages input x 8/7, as "
                   "Resize(256))")
    p.add_argument("--cache-max-gb", type=number(float, 0), default=20.0, help="bound on "
                   "--cache-dir: the least recently used decoded splits are removed beyond it")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "s3l"),
                   help="where decoded splits are cached")
    p.add_argument("--workers", type=number(int, 0), default=0, help="decoding processes (0: one "
                   "per core; at most one per core)")
    p.add_argument("--decode-timeout", type=POSITIVE, default=360.0, help="under torchrun, minutes "
                   "the other processes wait for a node's first process to decode a split (a gloo "
                   "barrier, not NCCL's 10-minute watchdog)")


CONV5_HELP = {  # what --no-conv5 means to each command
    "pretrain": "--no-conv5 removes layer4: S3L's small architecture",
    "finetune": "--no-conv5 leaves the checkpoint's layer4 unused: a fresh conv5 is fine-tuned "
                "(the official main.py --no-conv5 ablation)",
    "warmup-conv5": "--no-conv5 warms up a fresh conv5 even when the checkpoint has one (default: "
                    "the checkpoint's conv5, fresh only for a small-architecture checkpoint)",
    "linear": "--no-conv5 evaluates conv1-4 only (default: the checkpoint's layers)",
    "knn": "--no-conv5 evaluates conv1-4 only (default: the checkpoint's layers)"}


def add_model_args(p, input_size, command):
    p.add_argument("--arch", choices=sorted(models.ARCHS), help="backbone (default: the "
                   "checkpoint's, else resnet50 as in the paper)")
    p.add_argument("--conv5", action=argparse.BooleanOptionalAction, help=CONV5_HELP[command])
    p.add_argument("--small-stem", action=argparse.BooleanOptionalAction, help="3x3 stride-1 conv1 "
                   "and no max-pool, for inputs of 64 px and below")
    p.add_argument("--input-size", type=number(int, 8), default=input_size,
                   help="resolution in px (S3L pretrains at 112 or 56 and fine-tunes at 224; "
                   "default: pretrain 112, knn the checkpoint's, the other stages 224, or the "
                   "checkpoint's on the built-in data)")


def add_sync_bn_arg(p):
    p.add_argument("--sync-bn", action="store_true", help="under torchrun on GPUs: BatchNorm "
                   "statistics over the whole batch of every process (SyncBatchNorm), not per "
                   "process")


def add_optim_args(p):
    p.add_argument("--epochs", type=number(int, 1), help="passes over the training split")
    p.add_argument("--batch-size", type=number(int, 2), help="images per step, over all processes")
    p.add_argument("--lr", type=number(float, 0), help="base learning rate, SGD")
    p.add_argument("--weight-decay", "--wd", type=number(float, 0), help="on every parameter, BN "
                   "included")
    p.add_argument("--momentum", type=number(float, 0, 1), default=0.9)


def add_knn_args(p):
    p.add_argument("--knn-k", type=number(int, 1), default=200, help="neighbours in the kNN vote")
    p.add_argument("--knn-t", type=POSITIVE, default=0.1, help="temperature of the kNN votes")


def add_device_args(p, save_dir):
    p.add_argument("--save-dir", help="config.json, log.jsonl, summary.json, checkpoints "
                   f"(default: {save_dir}; with --resume, the checkpoint's own folder)")
    p.add_argument("--start-over", action="store_true", help="when --save-dir holds another "
                   "run's results, move them into a previous-<time>/ folder there and start anew")
    p.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0, help="seeds the "
                   "initialisation, the data order and the views")
    p.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype. CUDA: auto is bf16 on compute capability >= 8.0 (Ampere "
                   "on), else fp16 with a gradient scaler; off is fp32 (see --tf32). CPU: auto "
                   "and off are fp32, bf16 works (slower on most CPUs)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="CUDA on Ampere or newer: TF32 matmuls and convolutions in fp32 layers")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="NHWC memory format (measured 1.2-1.4x faster convolutions on CPU)")


def add_run_args(p):
    p.add_argument("--resume", help="checkpoint of this run to continue exactly from (the "
                   "settings that define the run must match it)")
    p.add_argument("--force-resume", action="store_true", help="resume even when those settings "
                   "differ from the checkpoint's (they are listed)")
    p.add_argument("--save-every", type=number(int, 1), default=20, help="numbered checkpoint "
                   "every N epochs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model and the "
                   "augmentation (same loss to float tolerance)")
    p.add_argument("--print-freq", type=number(int, 1), default=10, help="progress line (and loss "
                   "read-back) every N steps")


def parse_args(argv) -> argparse.Namespace:
    """Parse argv and resolve, once, every default that depends on other flags: a pretraining flag
    left unset takes its method's value (METHOD_DEFAULTS); SimCLR warms up only above a batch of
    WARMUP_MIN_BATCH; a BN group never exceeds the batch of a process (--sync-bn: one group);
    fine-tuning uses mixup only from a pretrained checkpoint. Nothing changes the returned settings
    afterwards."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "crop_scale", [0, 0])[0] > getattr(args, "crop_scale", [0, 0])[1]:
        parser.error(f"--crop-scale {args.crop_scale[0]} {args.crop_scale[1]}: the smaller area "
                     "fraction comes first")
    runs.check_process_flags(parser, args)
    settings, processes = dict(vars(args)), runs.world_size()
    if args.command == "pretrain" and args.method == "byol" and args.head:
        parser.error("--head is for moco and simclr: BYOL's projector and predictor have BN "
                     "by design (--byol-hidden-dim sets their width)")
    if args.command == "pretrain" and args.method != "byol":
        settings["head"] = args.head or "mlp"
    if args.command == "pretrain":
        paper = METHOD_DEFAULTS[args.method]
        settings.update({k: v for k, v in paper.items() if settings[k] is None})
        if args.warmup_epochs is None and settings["batch_size"] <= WARMUP_MIN_BATCH:
            settings["warmup_epochs"] = 0
        if args.bn_batch is None:
            per_process = settings["batch_size"] // processes
            settings["bn_batch"] = 0 if args.sync_bn else min(paper["bn_batch"], per_process)
    if args.command in ("finetune", "warmup-conv5") and args.bn_batch is None:
        per_process = settings["batch_size"] // processes
        settings["bn_batch"] = 0 if args.sync_bn else min(FINETUNE_BN_BATCH, per_process)
    if settings.get("batch_size") and settings["batch_size"] % processes:
        parser.error(f"--batch-size {settings['batch_size']} (the batch of all processes) does not "
                     f"divide among the {processes} processes: pass a multiple of {processes}")
    if args.command == "finetune" and args.mixup is None:
        settings["mixup"] = args.pretrained is not None
    if getattr(args, "random_resized_crop", False) is None:  # not on the built-in 32 px shapes
        settings["random_resized_crop"] = STAGE_DEFAULTS[args.command]["random_resized_crop"] \
            and args.data is not None  # measured there: 42.6 % vs 60.2 % (README)
    if args.command not in (None, "export") and args.save_dir is None:  # a resume continues in
        resume = getattr(args, "resume", None)  # its own folder, never in another run's
        settings["save_dir"] = os.path.dirname(resume) or "." if resume else f"runs/{args.command}"
    cores = os.cpu_count() or 1
    if getattr(args, "workers", 0) > cores:
        print(f"note: --workers {args.workers} is more than the {cores} cores: {cores} decode")
        settings["workers"] = cores
    return argparse.Namespace(**settings)


# ----- data, from the flags (the device: runs.runtime_for) ----------------------------------------

def store_args(args, runtime: runs.Runtime) -> dict:
    """data.load_store's settings from the flags: --store-size (small resolution, paper map), the
    cache, the training device; under torchrun a node's first process decodes a split, the others
    then read its cache."""
    return dict(store_size=args.store_size, cache_dir=args.cache_dir, workers=args.workers,
                cache_max_gb=args.cache_max_gb, device=runtime.device,
                processes=runtime.local_world_size, around_decode=runtime.local_rank_0_first)


def train_split_args(args, runtime: runs.Runtime) -> dict:
    """data.load_train_store's settings: store_args and the --subset of small data (paper map),
    seeded by --seed, recorded in --save-dir by rank 0."""
    return dict(store_args(args, runtime), subset=args.subset, seed=args.seed,
                save_dir=args.save_dir, writes=runtime.is_main)


# ----- the architecture: resolved once from the flags and the checkpoint --------------------------

@dataclass(frozen=True)
class Architecture:
    """The ResNet a stage builds. conv5=False is S3L's small architecture (no layer4)."""
    arch: str
    conv5: bool
    small_stem: bool
    input_size: int

    def build(self, num_classes: int = 0) -> models.ResNet:
        return models.ARCHS[self.arch](num_classes, conv5=self.conv5, small_stem=self.small_stem)


def resolve_architecture(args, state=None, input_size=None) -> Architecture:
    """--arch, --small-stem, --conv5 and --input-size, checked against a checkpoint's backbone.

    state: a backbone state_dict or None. Without one: the flags, else the paper's ResNet-50 with
    conv5 and ImageNet stem. With one: its architecture read off its keys and shapes (a flag that
    contradicts it exits), conv5 as the checkpoint unless --conv5/--no-conv5 says otherwise.
    input_size: the size to use when --input-size is unset (kNN: the checkpoint's).
    """
    size = args.input_size or input_size or 224
    if state is None:
        return Architecture(args.arch or "resnet50", args.conv5 is not False,
                            bool(args.small_stem), size)
    arch, conv5, small_stem = runs.infer_arch(state)
    if (args.arch or arch) != arch or args.small_stem not in (None, small_stem):
        asked = f"--arch {args.arch or arch}" + ("" if args.small_stem is None else
                                                 f" --{'' if args.small_stem else 'no-'}small-stem")
        raise SystemExit(f"the checkpoint holds a {arch} backbone (small_stem={small_stem}, "
                         f"conv5={conv5}), but {asked} was asked: drop the flag or pass a matching "
                         "checkpoint")
    return Architecture(arch, conv5 if args.conv5 is None else args.conv5, small_stem, size)


# ----- a run: its log, its bookkeeping (runs.Run), its summary -----------------------------------

def due(epoch: int, epochs: int, every: int) -> bool:
    """Whether an evaluation follows epoch `epoch` (from 0), pretraining's kNN monitor or a
    supervised stage's test top-1 (paper map): every `every` epochs (0: none) and after the last."""
    return epoch + 1 == epochs or bool(every) and (epoch + 1) % every == 0


def run_log(args, runtime: runs.Runtime, architecture: Architecture, resumed=None,
            run_id: str = None, classes: int = 0) -> runs.RunLog:
    """The run folder of this command, its config.json holding every resolved setting and the
    run's id (runs.claim_run_folder: a resume continues only the run of its checkpoint).
    classes: a classifier's, whose loss at chance is ln(classes)."""
    config = dict(vars(args), architecture=asdict(architecture), runtime=runtime.reason,
                  world_size=runtime.world_size, run_id=run_id)
    return runs.RunLog(args.save_dir, config, resumed["epoch"] if resumed else None,
                       writes=runtime.is_main, stop_diverging=args.command != "pretrain",
                       chance=math.log(classes) if classes > 1 else None)


def open_run(args, runtime, *, architecture: Architecture, model, params, resumed, train_store,
             stages: list, steps: int, stage: dict, results: dict = None) -> runs.Run:
    """The bookkeeping of a training loop (runs.Run) from the flags: the run log, SGD on `params`
    with the gradient scaler, restored from the --resume checkpoint `resumed` once it is checked to
    be this run's (runs.check_resume), or fresh. stage: this stage's record for cost accounting
    (study.py): epochs, macs_per_image (models.macs), images_per_epoch, and what else describes it.
    """
    if resumed:
        runs.check_resume(args.resume, resumed, vars(args), train_store.paths,
                          world_size=runtime.world_size, force=args.force_resume)
    optimizer = runtime.sgd(params, args.lr, args.momentum, args.weight_decay)
    state = runs.TrainState(model, optimizer, runtime.scaler())
    run_id = (resumed or {}).get("run_id") or runs.new_run_id()
    fields = dict(kind=args.command, config=vars(args), architecture=asdict(architecture),
                  train_files=runs.files_digest(train_store.paths), run_id=run_id)
    causes = f"lower --lr (now {args.lr:g}) or --weight-decay (now {args.weight_decay:g}); " \
        f"--batch-size {args.batch_size}; {runtime.precision_cause()}"
    # a fine-tuning far above chance in epoch 1 diverged; the probe's lr 10 on raw features is
    # far above it by design and still converges (README)
    classes = len(train_store.classes) if args.command in ("finetune", "warmup-conv5") else 0
    return runs.Run(runtime, state, run_log(args, runtime, architecture, resumed, run_id, classes),
                    resumed,
                    save_dir=args.save_dir, save_every=args.save_every, seed=args.seed,
                    epochs=args.epochs, steps=steps, batch_size=args.batch_size, stages=stages,
                    images=len(train_store), print_freq=args.print_freq, fields=fields,
                    stage=dict(command=args.command, **asdict(architecture), **stage),
                    results=results, causes=causes, order_device=train_store.index_device)


def summarize(args, log, runtime, *, architecture: Architecture, stages: list, **results) -> dict:
    """summary.json of a training command: its backbone, results and the pipeline's stages."""
    summary = dict(command=args.command, **asdict(architecture), epochs=args.epochs, **results,
                   wall_s=stages[-1]["wall_s"], device=runtime.reason,
                   checkpoint=os.path.join(args.save_dir, "checkpoint.pt"), stages=stages)
    log.summary(summary)
    return summary


# ----- evaluation: kNN (the features and top-1 of centre views: runs.py) -------------------------

def knn_eval(net, bank: data.ImageStore, queries: data.ImageStore, *, input_size: int,
             runtime: runs.Runtime, k: int, t: float) -> float:
    """kNN top-1 (%) of the backbone `net`: `bank` is the labelled memory, `queries` are
    classified."""
    feats = [runs.extract_features(net, s, input_size, runtime) for s in (bank, queries)]
    return s3l.knn_top1(feats[0], bank.labels, feats[1], queries.labels, k, t)


# ----- one training step: what the loops run and bench.py times ----------------------------------

def pretrain_views(store: data.ImageStore, idx: torch.Tensor, augmenter: augment.SSLAugment,
                   generator: torch.Generator, runtime: runs.Runtime, apply=None):
    """Two views of the batch `idx` (B,) of all processes, this process's share (n of B), made from
    the uint8 store on the device (augment.SSLAugment; apply: its compiled apply). The parameters
    of the whole batch are drawn, so any number of processes sees the same views.
    Returns view1, view2: (n, 3, input_size, input_size) each, as the model wants them."""
    images, _ = store.batch(runtime.share(idx), runtime.device)  # uint8 (n, 3, L, L)
    params = [runtime.share(augmenter.sample(store.sizes_of(idx), generator)) for _ in range(2)]
    return tuple(runtime.prepare((apply or augmenter.apply)(images, p)) for p in params)


def pretrain_step(model, state: runs.TrainState, runtime: runs.Runtime, view1: torch.Tensor,
                  view2: torch.Tensor) -> torch.Tensor:
    """One SSL step, the same for every method: loss = model(view1, view2) under the precision
    context, backward, SGD. view1, view2: (n, 3, H, W). Returns the loss, not read back."""
    with runtime.autocast():
        loss = model(view1, view2)
    return sgd_step(state, loss)


def supervised_step(model, state: runs.TrainState, runtime: runs.Runtime, x: torch.Tensor,
                    y: torch.Tensor, mixup_alpha: float = None) -> torch.Tensor:
    """One step of fine-tuning, the conv5 warm-up or the linear probe: cross-entropy of model(x)
    (mixup with one lambda a batch when mixup_alpha), backward, SGD. x: (n, 3, H, W), y: (n,)."""
    with runtime.autocast():
        loss = s3l.classifier_loss(model, x, y, mixup_alpha)
    return sgd_step(state, loss)


def sgd_step(state: runs.TrainState, loss: torch.Tensor) -> torch.Tensor:
    """Backward and the optimizer step; the gradient scaler does nothing unless fp16."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss.detach()


# ----- pretraining: one loop for every method -----------------------------------------------------

def build_method(args, encoder, processes: int = 1) -> torch.nn.Module:
    """The method of --method around `encoder`, with the paper's hyperparameters from the resolved
    flags. Each of `processes` splits its share of the batch into BN groups of --bn-batch images
    (0: one group), emulating the official per-GPU BN."""
    bn_splits = args.batch_size // processes // args.bn_batch if args.bn_batch else 1
    if args.method == "moco":
        return s3l.MoCo(encoder, dim=args.dim, moco_k=args.moco_k, moco_m=args.moco_m,
                        moco_t=args.moco_t, bn_splits=bn_splits, head=args.head)
    if args.method == "simclr":
        return s3l.SimCLR(encoder, dim=args.dim, temperature=args.simclr_t,
                          base_temperature=args.simclr_base_t, bn_splits=bn_splits,
                          gather_negatives=not args.simclr_local_negatives, head=args.head)
    return s3l.BYOL(encoder, dim=args.dim, hidden_dim=args.byol_hidden_dim, tau=args.byol_tau,
                    bn_splits=bn_splits, predictor=args.byol_predictor)


def init_from(method, path: str, architecture: Architecture, method_name: str) -> list:
    """Multi-stage resolution (112 -> 224, paper map): start from an earlier stage's weights. The
    same method loads its whole state (encoders, heads, and the queue when its size matches);
    another method loads the backbone only. Returns the earlier stages, for cost accounting."""
    ckpt = runs.read_checkpoint(path)
    if ckpt.get("format") != "s3l" or ckpt.get("kind") != "pretrain":
        raise SystemExit(f"--init-from {path} is not a pretraining checkpoint of s3l")
    state, old = ckpt["model"], Architecture(**ckpt["architecture"])
    if replace(old, input_size=architecture.input_size) != architecture:
        raise SystemExit(f"--init-from {path} holds {old.arch} conv5={old.conv5} "
                         f"small_stem={old.small_stem}, but this run builds {architecture.arch} "
                         f"conv5={architecture.conv5} small_stem={architecture.small_stem}")
    if ckpt["config"]["method"] == method_name:
        if "queue" in state and state["queue"].shape != method.queue.shape:
            print(f"--init-from: the queue of size {tuple(state['queue'].shape)} dropped")
            state = {k: v for k, v in state.items() if not k.startswith("queue")}
        missing, unexpected = method.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("queue")]:
            raise SystemExit(f"--init-from {path}: missing {missing}, unexpected {unexpected}")
    else:
        runs.load_backbone(method.backbone, runs.backbone_state(state))
        print(f"--init-from: a {ckpt['config']['method']} checkpoint, so the backbone only")
    print(f"initialised from {path} ({old.input_size} px, {len(ckpt['stages'])} earlier stage(s))")
    return ckpt["stages"]


def pretrain(args) -> dict:
    """Self-supervised pretraining, step 1 of the S3L recipe (paper map); returns the summary."""
    resumed = runs.resume_checkpoint(args.resume, args.command, args.method, args.epochs)
    architecture = resolve_architecture(args)  # a resumed run: its config's (runs.check_resume)
    runtime = runs.runtime_for(args)
    train_store = data.load_train_store(args.data, args.train_split, architecture.input_size,
                                        min_crop_scale=args.crop_scale[0],
                                        **train_split_args(args, runtime))
    n = len(train_store)
    runs.check_pretrain_args(args, n, runtime.world_size)
    test_split = args.test_split or data.default_eval_split(args.data)
    bank, queries = data.knn_stores(train_store, args.data, test_split, architecture.input_size,
                                    knn_train=args.knn_train, knn_val=args.knn_val,
                                    **store_args(args, runtime))
    torch.manual_seed(args.seed)
    method = build_method(args, architecture.build(), runtime.world_size)
    method = runtime.place(s3l.fold_split_batchnorm_(method, runtime.fold_bn), args.sync_bn)
    if resumed:  # this stage's own record, last, is written anew
        stages = resumed["stages"][:-1]
    else:
        stages = init_from(method, args.init_from, architecture, args.method) \
            if args.init_from else []
    steps = n // args.batch_size  # drop_last, as the official loaders
    stage = dict(epochs=args.epochs, method=args.method, images=n,
                 images_per_epoch=steps * args.batch_size,
                 macs_per_image=models.macs(architecture.build(), architecture.input_size))
    run = open_run(args, runtime, architecture=architecture, model=method, resumed=resumed,
                   params=[p for p in method.parameters() if p.requires_grad],
                   train_store=train_store, stages=stages, steps=steps, stage=stage)
    augmenter = augment.SSLAugment(architecture.input_size, scale=tuple(args.crop_scale),
                                   solarize_p=args.solarize_p, blur_p=args.blur_p,
                                   resample_dtype=runtime.resample_dtype)
    loop_start = time.time()
    record, knn = train_ssl(args, runtime, run, method=method, train_store=train_store,
                            augmenter=augmenter, knn_sets=(bank, queries),
                            architecture=architecture)
    trained = (args.epochs - run.start["epoch"]) * stage["images_per_epoch"]
    return summarize(args, run.log, runtime, architecture=architecture, stages=run.all_stages(),
                     method=args.method, final_loss=record.get("loss"), knn_top1=knn,
                     macs_per_image=stage["macs_per_image"], train_images=n,
                     images_per_s=round(trained / (time.time() - loop_start), 1),
                     skipped_files=len(train_store.skipped),
                     health={k: v for k, v in record.items() if k in health.KEYS} or None)


def train_ssl(args, runtime, run: runs.Run, *, method, train_store, augmenter, knn_sets,
              architecture: Architecture):
    """The pretraining loop, the same for every method: per step, two views of a batch, then
    loss = method(view1, view2), backward and SGD (pretrain_step), label-free health every
    --print-freq steps; per epoch, the kNN monitor where labels exist, a log record, a checkpoint
    (run: runs.Run). Returns (the last epoch's record, the last kNN top-1 or None)."""
    model = runtime.wrap(torch.compile(method) if args.compile else method)  # DDP under torchrun
    train_step = runs.graphed_step(args, runtime, lambda *views: pretrain_step(
        model, run.state, runtime, *views), run.state.optimizer)  # --cuda-graphs
    apply = torch.compile(augmenter.apply) if args.compile else augmenter.apply  # one fused graph
    group = args.batch_size if args.sync_bn else args.bn_batch or \
        args.batch_size // runtime.world_size
    print(f"pretraining {args.method} {architecture.arch} conv5={architecture.conv5} at "
          f"{architecture.input_size} px on {len(train_store)} images: {run.num_steps} steps an "
          f"epoch, BN groups of {group} images")
    paper = METHOD_DEFAULTS[args.method]  # SimCLR's lr 0.5 is for batch 512: say so at batch 32
    lr_for_batch = paper["batch_size"] if args.lr == paper["lr"] and \
        args.batch_size != paper["batch_size"] else None
    record, knn = {}, None
    monitor = runs.health_monitor(args, runtime, run.num_steps, group, lr_for_batch)
    with run:
        for epoch in run.epochs():
            method.train()
            for step in run.steps():
                # the official cosine is per epoch; the warm-up per iteration
                lr_epoch = epoch + step / run.num_steps if epoch < args.warmup_epochs else epoch
                lr = s3l.lr_at(lr_epoch, args.epochs, args.lr, warmup_epochs=args.warmup_epochs)
                s3l.set_lr(run.state.optimizer, lr)
                view1, view2 = pretrain_views(train_store, run.batch(step), augmenter,
                                              run.generator, runtime, apply)
                loss = train_step(view1, view2)
                run.step_done(step, loss, lr)
                if monitor and monitor.due(step):  # label-free health, on the step's outputs
                    monitor.observe(epoch, step, method.outputs, loss)
            record = run.epoch_record()
            record.update(monitor.epoch_record(epoch, record["loss"]) if monitor else {})
            if knn_sets[0] is not None and due(epoch, args.epochs, args.knn_every):
                knn = knn_eval(method.backbone, *knn_sets, input_size=architecture.input_size,
                               runtime=runtime, k=args.knn_k, t=args.knn_t)
                record["knn_top1"] = round(knn, 2)
            run.save_epoch(record)
            if monitor and runtime.is_main:
                health.draw(args.save_dir)  # health.png from log.jsonl, every epoch
    return record, knn


# ----- supervised stages: fine-tuning, the conv5 warm-up, the linear probe ------------------------

def supervised_setup(args, build_conv5=None):
    """The common start of finetune, warmup-conv5, linear and knn: the --pretrained backbone (its
    arch read off it), the device, the labelled splits, and a seeded ResNet with one output per
    class. build_conv5: True builds layer4 whatever the checkpoint (fine-tuning trains the full
    network); None builds what the flags and checkpoint say.
    Returns (runtime, backbone, train_store, test_store, net, the checkpoint's earlier stages)."""
    ckpt, state = runs.read_backbone(args.pretrained)
    ckpt_size = runs.trained_input_size(ckpt, args.pretrained) if ckpt else None
    # kNN, and every stage on the built-in data (no --data), at the checkpoint's size by default
    own_size = args.command == "knn" or args.data is None
    size = ckpt_size if own_size else STAGE_DEFAULTS[args.command]["input_size"]
    if own_size and ckpt and not ckpt_size and not args.input_size:
        print(f"note: {args.pretrained} does not say the resolution it was trained at, so "
              f"{args.command} runs at 224 px: pass --input-size (e.g. the pretraining's)")
    architecture = resolve_architecture(args, state, input_size=size)
    built = architecture if build_conv5 is None else replace(architecture, conv5=build_conv5)
    runtime = runs.runtime_for(args)
    test_split = args.test_split or data.default_eval_split(args.data)
    train_store, test_store = data.labelled_splits(
        args.data, args.train_split, test_split, built.input_size, command=args.command,
        **train_split_args(args, runtime))
    torch.manual_seed(args.seed)
    net = built.build(num_classes=len(train_store.classes))
    if state is not None:  # backbone.conv5: the checkpoint's conv5 is used
        runs.load_pretrained(net, state, args.pretrained, keep_conv5=architecture.conv5)
    stages = ckpt.get("stages", []) if ckpt else []
    return runtime, built, train_store, test_store, net, stages


def finetune(args) -> dict:
    """Fine-tune the whole network (step 3 of the recipe), or, as `warmup-conv5`, train conv5 + fc
    on frozen SSL conv1-4 (step 2, small architecture). No --pretrained: from scratch."""
    warmup = args.command == "warmup-conv5"
    runtime, architecture, train_store, test_store, net, stages = supervised_setup(
        args, build_conv5=True)
    if args.bn_batch:  # per-GPU BN; a last, smaller batch splits as evenly as possible
        s3l.split_batchnorm_(net, args.batch_size // runtime.world_size // args.bn_batch)
        s3l.fold_split_batchnorm_(net, runtime.fold_bn)
    frozen_bn = []
    if warmup:  # fc N(0, 0.01) as the official main_freeze.py; only conv5 and fc learn
        torch.nn.init.normal_(net.fc.weight, std=0.01)
        torch.nn.init.zeros_(net.fc.bias)
        trainable = s3l.freeze_all_but_conv5(net)
        print(f"warm-up trains {len(trainable)} tensors (layer4.*, fc.*); conv1-4 are frozen")
        if args.frozen_bn_eval:
            frozen_bn = [m for name, m in net.named_modules() if not name.startswith("layer4")
                         and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    net = runtime.place(net, args.sync_bn)
    model = torch.compile(net) if args.compile else net  # checkpoints from `net`: no _orig_mod.
    params = [p for p in net.parameters() if p.requires_grad]
    mixup_alpha = args.mixup_alpha if args.mixup else None
    return train_classifier(args, runtime, architecture=architecture, net=net, model=model,
                            params=params, train_store=train_store, test_store=test_store,
                            stages=stages, frozen_bn=frozen_bn, mixup_alpha=mixup_alpha)


def linear(args) -> dict:
    """Linear probe on frozen features (the official --linear-eval): backbone frozen with BN in eval
    mode, fc N(0, 0.01), SGD lr 10 with x0.1 steps, random crop + flip every epoch. With
    --cached-features: centre-crop features computed once and trained on (fast, not official)."""
    runtime, architecture, train_store, test_store, net, stages = supervised_setup(args)
    torch.nn.init.normal_(net.fc.weight, std=0.01)
    torch.nn.init.zeros_(net.fc.bias)
    net = runtime.place(net.requires_grad_(False))
    net.fc.requires_grad_(True)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    if args.cached_features:
        summary = linear_on_cached_features(args, runtime, architecture=architecture, net=net,
                                            train_store=train_store, test_store=test_store,
                                            stages=stages)
    else:
        summary = train_classifier(args, runtime, architecture=architecture, net=net, model=net,
                                   params=list(net.fc.parameters()), train_store=train_store,
                                   test_store=test_store, stages=stages, frozen_bn=[net],
                                   mixup_alpha=None)
    for key, value in net.state_dict().items():  # MoCo's lincls sanity check
        assert key.startswith("fc.") or torch.equal(value, frozen[key]), f"the probe changed {key}"
    return summary


def train_classifier(args, runtime, *, architecture: Architecture, net, model, params, train_store,
                     test_store, stages: list, frozen_bn: list, mixup_alpha) -> dict:
    """The supervised loop of finetune, warmup-conv5 and the official linear probe: per step, the
    official train view of a batch (Resize -> RandomCrop, or RandomResizedCrop, + flip), cross-
    entropy (mixup: one lambda a batch, pairs within a process's share), SGD (supervised_step);
    per epoch, test top-1 of centre views. net: the module checkpointed; model: what runs it
    (compiled or not); params: what SGD trains; frozen_bn: modules kept in eval mode. Reports the
    final-epoch top-1 and the best epoch's, labelled as chosen on the test split (optimistic; the
    official code reports it)."""
    resumed = runs.resume_checkpoint(args.resume, args.command, epochs=args.epochs)
    best = resumed["best"] if resumed else dict(test_top1=None, epoch=None)
    acc = resumed["test_top1"] if resumed else None
    n, bs = len(train_store), args.batch_size
    # the last, smaller batch only if each process gets 2 images of it (BatchNorm needs 2)
    steps = n // bs + (n % bs >= 2 * runtime.world_size)
    stage = dict(epochs=args.epochs, images_per_epoch=min(n, steps * bs),
                 macs_per_image=models.macs(architecture.build(), architecture.input_size))
    run = open_run(args, runtime, architecture=architecture, model=net, params=params,
                   resumed=resumed, train_store=train_store, stages=stages, steps=steps,
                   stage=stage, results=dict(best=best, test_top1=acc))
    trained = runtime.wrap(model)  # DDP under torchrun
    with run:
        for epoch in run.epochs():
            net.train()
            for module in frozen_bn:
                module.eval()
            for step in run.steps():
                lr = s3l.lr_at(epoch + step / steps, args.epochs, args.lr, steps=args.lr_steps)
                s3l.set_lr(run.state.optimizer, lr)
                x, y = classifier_batch(train_store, run.batch(step), run.generator, runtime,
                                        architecture.input_size, args.random_resized_crop)
                loss = supervised_step(trained, run.state, runtime, x, y, mixup_alpha)
                run.step_done(step, loss, lr)
            record = run.epoch_record()
            if due(epoch, args.epochs, args.eval_every):
                acc = runs.classify_top1(model, test_store, architecture.input_size, runtime)
                record["test_top1"] = round(acc, 2)
                best = best_top1(best, acc, epoch)
            run.save_epoch(record, best=best, test_top1=acc)
    return finish_supervised(args, run.log, runtime, architecture=architecture, acc=acc, best=best,
                             stages=run.all_stages())


def classifier_batch(train_store: data.ImageStore, idx: torch.Tensor, generator, runtime,
                     input_size: int, random_resized_crop: bool = False):
    """This process's share of the supervised batch `idx` (of all processes) as the official train
    transform makes it (Resize -> RandomCrop + flip; paper map: fine-tuning), and its labels.
    The crops of the whole batch are drawn, as in train_ssl: the same views for any number of
    processes. Returns (x (n, 3, input_size, input_size) as the model wants it, y (n,))."""
    mine = runtime.share(idx)
    images, _ = train_store.batch(mine, runtime.device)
    crops = augment.finetune_train_params(train_store.sizes_of(idx), input_size, generator,
                                          random_resized_crop)
    x = augment.finetune_train_view(images, runtime.share(crops), input_size,
                                    dtype=runtime.resample_dtype)
    return runtime.prepare(x), train_store.labels_of(mine)


def best_top1(best: dict, acc: float, epoch: int) -> dict:
    """The best test top-1 so far and its epoch, after top-1 `acc` in epoch `epoch` (from 0): the
    number the official fine-tuning code reports (paper map), logged beside the final-epoch one and
    labelled as chosen on the test split."""
    if best["test_top1"] is None or acc > best["test_top1"]:
        return dict(test_top1=round(acc, 2), epoch=epoch + 1)
    return best


def linear_on_cached_features(args, runtime, *, architecture: Architecture, net, train_store,
                              test_store, stages: list) -> dict:
    """The fast probe: centre-crop features of both splits computed once, then the fc trained on
    them with the probe's schedule (full-batch epochs of minibatches, no augmentation)."""
    log, t0 = run_log(args, runtime, architecture), time.time()
    feats = [runs.extract_features(net, s, architecture.input_size, runtime, normalize=False)
             for s in (train_store, test_store)]
    optimizer = runtime.sgd(net.fc.parameters(), args.lr, args.momentum, args.weight_decay)
    n, bs = len(train_store), args.batch_size
    best, acc = dict(test_top1=None, epoch=None), None
    for epoch in range(args.epochs):
        order = runs.epoch_order(args.seed, epoch, n, generator=torch.Generator(),
                                 device=runtime.device)
        lr = s3l.lr_at(epoch, args.epochs, args.lr, steps=args.lr_steps)
        s3l.set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=runtime.device)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            loss = F.cross_entropy(net.fc(feats[0][idx]), train_store.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
        with torch.no_grad():
            acc = 100.0 * (net.fc(feats[1]).argmax(1) == test_store.labels).float().mean().item()
        best = best_top1(best, acc, epoch)
        log.record(dict(epoch=epoch + 1, loss=loss_sum.item() / math.ceil(n / bs), lr=lr,
                        test_top1=round(acc, 2)))
    wall = time.time() - t0
    macs = models.macs(architecture.build(), architecture.input_size)
    stages = stages + [dict(command=args.command, **asdict(architecture), wall_s=round(wall, 1),
                            epochs=args.epochs, macs_per_image=macs, images_per_epoch=n,
                            cached_features=True)]
    if runtime.is_main:  # every process trained the same fc on the same gathered features
        runs.save_checkpoint(os.path.join(args.save_dir, "checkpoint.pt"), dict(
            format="s3l", kind=args.command, model=net.state_dict(), epoch=args.epochs,
            wall_s=wall, config=vars(args), architecture=asdict(architecture), stages=stages,
            best=best, test_top1=acc))
    return finish_supervised(args, log, runtime, architecture=architecture, acc=acc, best=best,
                             stages=stages)


def finish_supervised(args, log, runtime, *, architecture: Architecture, acc: float, best: dict,
                      stages: list) -> dict:
    """summary.json and the closing line of a supervised stage."""
    protocol = None
    if args.command == "linear":
        protocol = "cached centre-crop features" if args.cached_features else \
            "official: random crop + flip through the frozen backbone"
    summary = summarize(args, log, runtime, architecture=architecture, stages=stages,
                        protocol=protocol, test_top1_final=acc,
                        test_top1_best_chosen_on_test=best["test_top1"], best_epoch=best["epoch"])
    print(f"{args.command}{f' ({protocol})' if protocol else ''}: final-epoch test top-1 "
          f"{acc:.2f}% (best {best['test_top1']:.2f}% at epoch {best['epoch']}, chosen on the test "
          f"split); {stages[-1]['wall_s'] / 60:.1f} min")
    return summary


def knn(args) -> dict:
    """Weighted kNN top-1 of a checkpoint's backbone, or of the untrained one (seeded)."""
    runtime, architecture, bank, queries, net, _ = supervised_setup(args)
    log, t0 = run_log(args, runtime, architecture), time.time()
    acc = knn_eval(runtime.place(net), bank, queries, input_size=architecture.input_size,
                   runtime=runtime, k=args.knn_k, t=args.knn_t)
    record = dict(knn_top1=round(acc, 2), k=args.knn_k, t=args.knn_t, bank=len(bank),
                  queries=len(queries), input_size=architecture.input_size,
                  wall_s=round(time.time() - t0, 1))
    log.record(record)
    log.summary(dict(command="knn", pretrained=args.pretrained, arch=architecture.arch,
                     conv5=architecture.conv5, **record))
    return record


# ----- the default job ----------------------------------------------------------------------------

def default_job(job=DEFAULT_JOB) -> None:
    """`python train.py`: S3L on the built-in shapes at CPU scale, then kNN top-1 (k=200, T=0.1; the
    2,000 train images as memory, 1,000 test images as queries), untrained vs pretrained."""
    t0 = time.time()
    args = parse_args(job)
    summary = run_command(args)
    runtime = runs.runtime_for(args)
    architecture = resolve_architecture(args)
    store = store_args(args, runtime)
    bank = data.load_store(args.data, "train", args.input_size, min_crop_scale=args.crop_scale[0],
                           **store)
    queries = data.load_store(args.data, "test", args.input_size, **store)
    torch.manual_seed(args.seed)  # the very initialisation the pretraining started from
    before = knn_eval(runtime.place(architecture.build()), bank, queries,
                      input_size=args.input_size, runtime=runtime, k=args.knn_k, t=args.knn_t)
    print(f"\nkNN top-1 on the built-in shapes ({len(queries)} test images, {len(data.SHAPES)} "
          f"classes, {architecture.arch} at {args.input_size} px, final epoch)")
    print(f"{'backbone':<34}{'kNN top-1 %':>12}")
    for name, acc in [("untrained", before),
                      (f"{args.method} pretrained, {args.epochs} epochs", summary["knn_top1"])]:
        print(f"{name:<34}{acc:>12.1f}")
    print(f"total time {time.time() - t0:.0f} s on {runtime.reason}; {summary['checkpoint']}")


# ----- main ---------------------------------------------------------------------------------------

COMMANDS = {"pretrain": pretrain, "finetune": finetune, "warmup-conv5": finetune, "linear": linear,
            "knn": knn, "export": lambda args: runs.export_backbone(args.checkpoint, args.out)}


def run_command(args):
    """One command in its own locked --save-dir (rank 0 holds the lock under torchrun: the folder
    is its alone); data errors become one line, not a trace."""
    runs.check_paths(args)
    locks = args.command != "export" and (runs.torchrun_ranks() or (0,))[0] == 0
    if locks:
        runs.lock_run_folder(args.save_dir)
    try:
        if locks:
            runs.claim_run_folder(args.save_dir, getattr(args, "resume", None), args.start_over)
        return COMMANDS[args.command](args)
    except ValueError as e:  # data errors (missing folders, a bad --subset)
        raise SystemExit(f"error: {e}") from None
    finally:
        if locks:
            runs.unlock_run_folder(args.save_dir)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with runs.torchrun_scope():  # torchrun: rank 0 prints; the group is left at the end
        if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            # `python train.py --resume runs/default/checkpoint.pt` (the hint of an interrupted
            # default job), or any pretraining flag changed: the default job with these flags
            return default_job(DEFAULT_JOB + argv)
        args = parse_args(argv)
        if args.command is None:
            return build_parser().print_help()
        run_command(args)


if __name__ == "__main__":
    main()
