"""The command line of train.py: every flag with its default and help text, the value types that
check each number, and the checks of flags against each other and the data, before any work.

The defaults are the official S3L code's (Cao & Wu 2021, arXiv 2103.13559), per method and per
stage: s3l.METHOD_DEFAULTS and s3l.STAGE_DEFAULTS. parse_args resolves every flag that depends on
another once, into plain values; nothing below the command line reads these flags again.
"""
import argparse
import math
import os

import torch

import data
import devices
import models
import runs
import s3l


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` from the parser itself (never typed by hand), except for None."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def number(kind=int, low=None, high=None, open_low=False):
    """An argparse type: a number of `kind` in [low, high] ((low, high] with open_low); a value
    outside gets an error naming the flag and the allowed range."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        too_low = low is not None and (value <= low if open_low else value < low)
        if too_low or (high is not None and value > high) or not math.isfinite(value):
            bounds = f"{'(' if open_low else '['}{low}, {high}]" if high is not None else \
                f"{'>' if open_low else '>='} {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


POSITIVE = number(float, 0, open_low=True)


def device_name(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N."""
    try:
        ok = text == "auto" or torch.device(text).type in ("cpu", "cuda")
    except RuntimeError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


class Parser(argparse.ArgumentParser):
    """argparse's parser that also keeps the set of its flags, for stage_flags."""

    def __init__(self, *args, **kwargs):
        self.flags = set()  # before argparse's __init__, which adds -h
        super().__init__(*args, **kwargs)

    def add_argument(self, *names, **kwargs):
        self.flags.update(name for name in names if name.startswith("-"))
        return super().add_argument(*names, **kwargs)


def check_process_flags(parser, args) -> None:
    """train.py's flags about several processes, checked before any work (parser.error)."""
    sync_bn = getattr(args, "sync_bn", False)
    if (sync_bn or getattr(args, "simclr_local_negatives", False)) and devices.world_size() == 1:
        flag = "--sync-bn" if sync_bn else "--simclr-local-negatives"
        parser.error(f"{flag} is for several processes (torchrun); one process has BN groups of "
                     "--bn-batch images (0: the whole batch) and the whole batch as negatives")
    if sync_bn and (getattr(args, "bn_batch", None) or getattr(args, "method", None) == "byol"):
        parser.error("--sync-bn makes one BN group of the whole batch: drop --bn-batch (BYOL, "
                     "whose BN is per view: use --bn-batch instead of --sync-bn)")


def subset_spec(text: str) -> str:
    """An argparse type: a --subset spec in one of data.SUBSET_FORMS, kept as text."""
    try:
        data.parse_subset(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(": ", 1)[1]) from None
    return text


def check_pretrain_args(args, n_train: int, processes: int) -> None:
    """pretrain's flags against its training split, before any work: each error names the flag and
    the fix; a note when drop_last leaves over a tenth of the images out."""
    if args.batch_size > n_train:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training split "
                         f"({n_train} images): lower --batch-size")
    per_process = args.batch_size // processes
    if args.bn_batch and per_process % args.bn_batch:
        shared = f" over {processes} processes ({per_process} each)" if processes > 1 else ""
        raise SystemExit(f"--batch-size {args.batch_size}{shared} is not a multiple of --bn-batch "
                         f"{args.bn_batch}")
    if args.method == "moco" and args.moco_k % args.batch_size:
        raise SystemExit(f"--moco-k {args.moco_k} is not divisible by --batch-size "
                         f"{args.batch_size} (MoCo's queue takes whole batches): change one")
    dropped = n_train % args.batch_size
    if dropped > 0.1 * n_train:
        print(f"note: batches of {args.batch_size} leave {dropped} of {n_train} images out of "
              "every epoch (drop_last, as the official loaders); a smaller --batch-size uses them")


def check_paths(args) -> None:
    """train.py's paths, checked before any decoding: each error names the flag and what to do."""
    for flag in ("data", "knn_train", "knn_val"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isdir(path):
            what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
            raise SystemExit(f"--{flag.replace('_', '-')} {path} {what}: pass a folder of images")
    for flag in ("resume", "init_from", "pretrained"):
        path = getattr(args, flag, None)
        if path is not None and not os.path.isfile(path):
            raise SystemExit(f"--{flag.replace('_', '-')} {path}: no such checkpoint file")
    if hasattr(args, "cache_dir"):
        runs.check_writable_folder(args.cache_dir, "--cache-dir")


def runtime_for(args) -> devices.Runtime:
    """The device, precision and processes every stage of the recipe (paper map) runs with, from
    the flags (setup_device); --sync-bn checked against the device."""
    runtime = devices.setup_device(args.device, args.amp, args.channels_last, args.tf32,
                                   getattr(args, "decode_timeout", 360.0))
    if getattr(args, "sync_bn", False) and runtime.device.type != "cuda":
        raise SystemExit("--sync-bn needs CUDA GPUs: torch's SyncBatchNorm has no CPU kernel")
    check_cuda_graphs(args, runtime)  # before any work, not once the run has started
    return runtime


def check_cuda_graphs(args, runtime: devices.Runtime) -> None:
    """With --cuda-graphs, stop where no graph can be captured, naming each thing in the way."""
    if not getattr(args, "cuda_graphs", False):
        return
    why = [reason for reason, stands in (
        (f"it needs a CUDA device (this run is on {runtime.device.type})",
         runtime.device.type != "cuda"),
        ("fp16's gradient scaler reads back every step: use --amp bf16 or off",
         runtime.amp_dtype == torch.float16),
        ("one process only, not under torchrun", runtime.distributed),
        ("not with --compile: choose one of the two", args.compile)) if stands]
    if why:
        raise SystemExit(f"--cuda-graphs: {'; '.join(why)}; or drop --cuda-graphs")


# The default job (`python train.py`): S3L's three parts at CPU scale (32 px, ResNet-18, 2,000
# images), measured at ~3 minutes on 2 cores. SimCLR learns fastest in a few hundred steps (MoCo's
# momentum encoder and queue need longer); crop scale 0.5 keeps the shape in most crops of a 32 px
# image (measured: scale 0.2 gives +6 kNN points, 0.5 gives +16 to +22).
DEFAULT_JOB = ["pretrain", "--method", "simclr", "--arch", "resnet18", "--input-size", "32",
               "--epochs", "30", "--batch-size", "128", "--lr", "0.3", "--simclr-t", "0.2",
               "--simclr-base-t", "0.2", "--warmup-epochs", "0", "--bn-batch", "128",
               "--crop-scale", "0.5", "1.0", "--save-dir", "runs/default", "--knn-every", "0",
               "--start-over"]  # a second `python train.py` moves the first one's files aside


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
    p.add_argument("--warmup-epochs", type=number(float, 0), help="linear warm-up from lr 0.01, "
                   "per iteration (default: 10 for SimCLR and BYOL when the batch exceeds "
                   f"{s3l.WARMUP_MIN_BATCH}, else 0)")
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
                           f"emulating the official 4 GPUs (default: {s3l.FINETUNE_BN_BATCH}, at "
                           "most a process's batch); 0: the whole batch of a process")
            add_sync_bn_arg(p)
        if name == "warmup-conv5":
            p.add_argument("--frozen-bn-eval", action="store_true", help="keep the BN layers of "
                           "the frozen conv1-4 in eval mode (the official code updates their "
                           "statistics)")
        p.add_argument("--eval-every", type=number(int, 1), default=1, help="test top-1 every N "
                       "epochs and at the end")
        add_device_args(p, save_dir=f"runs/{name}")
        add_run_args(p)
        p.set_defaults(**{k: v for k, v in s3l.STAGE_DEFAULTS[name].items()
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
    check_process_flags(parser, args)
    settings, processes = dict(vars(args)), devices.world_size()
    if args.command == "pretrain" and args.method == "byol" and args.head:
        parser.error("--head is for moco and simclr: BYOL's projector and predictor have BN "
                     "by design (--byol-hidden-dim sets their width)")
    if args.command == "pretrain" and args.method != "byol":
        settings["head"] = args.head or "mlp"
    if args.command == "pretrain":
        paper = s3l.METHOD_DEFAULTS[args.method]
        settings.update({k: v for k, v in paper.items() if settings[k] is None})
        if args.warmup_epochs is None and settings["batch_size"] <= s3l.WARMUP_MIN_BATCH:
            settings["warmup_epochs"] = 0
        if args.bn_batch is None:
            per_process = settings["batch_size"] // processes
            settings["bn_batch"] = 0 if args.sync_bn else min(paper["bn_batch"], per_process)
    if args.command in ("finetune", "warmup-conv5") and args.bn_batch is None:
        per_process = settings["batch_size"] // processes
        settings["bn_batch"] = 0 if args.sync_bn else min(s3l.FINETUNE_BN_BATCH, per_process)
    if settings.get("batch_size") and settings["batch_size"] % processes:
        parser.error(f"--batch-size {settings['batch_size']} (the batch of all processes) does not "
                     f"divide among the {processes} processes: pass a multiple of {processes}")
    if args.command == "finetune" and args.mixup is None:
        settings["mixup"] = args.pretrained is not None
    if getattr(args, "random_resized_crop", False) is None:  # not on the built-in 32 px shapes
        settings["random_resized_crop"] = s3l.STAGE_DEFAULTS[args.command]["random_resized_crop"] \
            and args.data is not None  # measured there: 42.6 % vs 60.2 % (README)
    if args.command not in (None, "export") and args.save_dir is None:  # a resume continues in
        resume = getattr(args, "resume", None)  # its own folder, never in another run's
        settings["save_dir"] = os.path.dirname(resume) or "." if resume else f"runs/{args.command}"
    cores = os.cpu_count() or 1
    if getattr(args, "workers", 0) > cores:
        print(f"note: --workers {args.workers} is more than the {cores} cores: {cores} decode")
        settings["workers"] = cores
    return argparse.Namespace(**settings)
