"""The run folder of a training command: what it saves, how it runs, and how it survives faults.

Nothing here is specific to an SSL method; train.py's loops use it so that they can read like the
paper (S3L, arXiv 2103.13559: every stage of its recipe is one such loop).

  folder       lock_run_folder, unlock_run_folder (one run per folder), claim_run_folder (never
               mixed with another run's results), check_writable_folder
  checkpoints  save_checkpoint, read_checkpoint (atomic writes, a checksum inside), TrainState
               (the one checkpoint format); backbone_state, checkpoint_backbone, infer_arch,
               load_backbone, load_pretrained, export_backbone (a ResNet backbone out of ours,
               exports and the official ones: how the S3L recipe moves conv1-4 between stages)
  processes    torchrun_ranks, world_size, torchrun_scope (rank 0 prints; the group is left at the
               end), local_rank_0_first, broadcast_buffers, mean_over_processes (the meter's
               read-backs, so every process takes the same decision to stop)
  how it runs  Runtime, setup_device, runtime_for (the flags'): device, precision and
               channels_last, decided here, once; under torchrun the process group, each
               process's share of a batch, DDP; GraphedStep, graphed_step (--cuda-graphs: the
               step as one CUDA graph);
               centre_view_outputs, extract_features, classify_top1 (evaluation on centre
               views, shared out over the processes)
  records      RunLog (config.json, log.jsonl, summary.json: always valid JSON), EpochMeter (loss
               summed on the device, the progress line, non-finite losses caught), Interrupt
               (a context: SIGINT/SIGTERM end the current step, then the loop saves and exits)
  resuming     files_digest, resume_checkpoint, check_resume, epoch_order (--resume continues a
               run exactly)
  a loop       Run: the bookkeeping of every training loop of train.py behind a handful of calls
               (epochs, steps, batch, step_done, epoch_record, save_epoch); health_monitor
               (health.py's label-free measures for a pretraining run, from its flags)
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

import augment
import data
import health
import models

LOCK_NAME = ".lock"


# ----- the command line's value types and checks (argparse), for train.py and study.py ----------

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
    if (sync_bn or getattr(args, "simclr_local_negatives", False)) and world_size() == 1:
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
        check_writable_folder(args.cache_dir, "--cache-dir")


# ----- the run folder: one run at a time ----------------------------------------------------------

def check_writable_folder(path: str, flag: str) -> None:
    """Exit with a message naming `flag` unless `path` is (or can be made) a writable folder."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot create the folder ({e.strerror}): pass another "
                         "path") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SystemExit(f"{flag} {path}: the folder is not writable: pass another path")


def lock_run_folder(save_dir: str) -> None:
    """Take save_dir/.lock (pid and host inside), or exit if another live run holds it.

    Two runs writing one folder would mix their checkpoints and logs. A lock left by a dead process
    of this host is taken over with a message; leftover temporary files are removed.
    """
    check_writable_folder(save_dir, "--save-dir")
    path, me = os.path.join(save_dir, LOCK_NAME), f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(path) as f:
                pid, _, host = f.read().strip().partition(" ")
            # an empty lock: its writer found the disk full (or died) before writing its pid
            empty = not pid and time.time() - os.path.getmtime(path) > 5
            if not empty and (host != socket.gethostname() or not pid.isdigit() or
                              data.pid_alive(int(pid))):
                who = f"process {pid} on {host}" if pid else "a run that is starting"
                raise SystemExit(f"--save-dir {save_dir} is in use by {who}: "
                                 "wait for it to finish, or pass another --save-dir (if that "
                                 f"run is gone, delete {path})") from None
            print(f"{path}: " + ("an empty lock, left by a run that could not write it" if empty
                                 else f"process {pid} is gone") + ", taking the folder over")
            os.remove(path)
            continue
        try:
            os.write(fd, me.encode())
        except OSError as e:  # a full disk: no lock left behind, one line
            os.close(fd)
            os.remove(path)
            raise write_failed(path, e, "--save-dir", lost="Nothing was started.") from None
        os.close(fd)
        break
    for name in os.listdir(save_dir):  # temp files of a run killed mid-write
        if name.endswith(".tmp"):
            os.remove(os.path.join(save_dir, name))


def new_run_id() -> str:
    """A new run's id, kept in its config.json and every checkpoint (a resume keeps it)."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(4).hex()}"


def folder_run_id(save_dir: str):
    """The id of the run whose config.json is in save_dir, or None (none, or written before ids)."""
    try:
        with open(os.path.join(save_dir, "config.json")) as f:
            return json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_run_id(path: str):
    """The run id of a checkpoint, read without loading its tensors (mmap), or None."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- resume_checkpoint says what is wrong with the file
        return None
    return ckpt.get("run_id") if isinstance(ckpt, dict) else None


def claim_run_folder(save_dir: str, resume: str, start_over: bool) -> None:
    """A run never mixes its files with another run's results (checkpoint.pt, summary.json): such a
    folder is refused, unless it holds the run that `resume` (the --resume path) continues (the
    same run id, or the checkpoint lies in it), or start_over (--start-over, a new run) moves every
    file of the old run into save_dir/previous-<time>/ first."""
    results = [n for n in ("checkpoint.pt", "summary.json")
               if os.path.exists(os.path.join(save_dir, n))]
    if not results:
        return
    if resume:
        inside = os.path.realpath(os.path.dirname(os.path.abspath(resume))) == \
            os.path.realpath(save_dir)
        held = folder_run_id(save_dir)
        if inside or held is not None and held == checkpoint_run_id(resume):
            return
        raise SystemExit(f"--save-dir {save_dir} holds another run's results ({', '.join(results)})"
                         f", not the run of --resume {resume}: continue that run in its own folder "
                         f"(drop --save-dir, or pass --save-dir {os.path.dirname(resume) or '.'}) "
                         "or pass an empty --save-dir")
    if not start_over:
        raise SystemExit(f"--save-dir {save_dir} holds another run's results ({', '.join(results)})"
                         f": continue it with --resume {save_dir}/checkpoint.pt, keep it and pass "
                         "another --save-dir, or pass --start-over to move its files aside")
    aside = os.path.join(save_dir, time.strftime("previous-%Y%m%d-%H%M%S"))
    os.makedirs(aside)
    for name in os.listdir(save_dir):
        if name != LOCK_NAME and not name.startswith("previous-"):
            os.replace(os.path.join(save_dir, name), os.path.join(aside, name))
    print(f"--start-over: the earlier run's files moved to {aside}")


def unlock_run_folder(save_dir: str) -> None:
    """Remove save_dir/.lock if this process holds it."""
    path = os.path.join(save_dir, LOCK_NAME)
    try:
        with open(path) as f:
            if f.read().split(" ")[0] == str(os.getpid()):
                os.remove(path)
    except OSError:
        pass


# ----- checkpoints --------------------------------------------------------------------------------

def state_digest(obj) -> str:
    """SHA-256 of a checkpoint's contents (tensors by their bytes, other values by repr), walked in
    key order: stored inside the file, it detects a file whose bytes changed after writing."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, dict):
            for key in sorted(x, key=str):
                h.update(repr(key).encode())
                walk(x[key])
        elif isinstance(x, (list, tuple)):
            for item in x:
                walk(item)
        elif isinstance(x, torch.Tensor):
            h.update(f"{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(x).encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically (a temp file of this process, then a rename): a crash mid-write never leaves
    a broken checkpoint. A dict is stored with its sha256 (state_digest) for read_checkpoint."""
    if isinstance(state, dict) and state.get("format") == "s3l":
        state = dict(state, sha256=state_digest(state))
    folder, name = os.path.split(os.path.abspath(path))
    for other in os.listdir(folder):  # the temp files of a writer that was killed
        pid = other[len(name) + 1:-len(".tmp")]
        if other.startswith(name + ".") and other.endswith(".tmp") and pid.isdigit() and \
                not data.pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, other))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # torch.save reports a full disk as a RuntimeError; Ctrl-C too
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            raise write_failed(path, e, "--save-dir or the output path") from None
        raise


def write_failed(path: str, error: Exception, where: str,
                 lost: str = "Nothing half-written was left; the last complete checkpoint is "
                             "unchanged.") -> SystemExit:
    """One line for a write that failed (a full disk, a read-only file system, no permission):
    the file, the free space of its folder and what to do; `where` names the flag to change,
    `lost` what became of the run's work."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    why = error.strerror if isinstance(error, OSError) and error.strerror else \
        str(error).splitlines()[0][:120]
    return SystemExit(f"error: cannot write {path} ({why}; {free} in {folder}): free some space "
                      f"there or pass another {where}. {lost}")


def read_checkpoint(path: str) -> dict:
    """Load a checkpoint file to CPU, or exit saying what it is and what was expected; a checkpoint
    of this project must match its stored sha256."""
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
    if "sha256" in ckpt:
        stored = ckpt.pop("sha256")
        if state_digest(ckpt) != stored:
            raise SystemExit(f"checkpoint {path} is corrupt: its contents do not match the "
                             "checksum written with it; use an earlier numbered checkpoint")
    if ckpt.get("format") == "s3l" and "backbone" in ckpt:  # written before it was renamed
        ckpt["architecture"] = ckpt.pop("backbone")
    return ckpt


@dataclass
class TrainState:
    """What a training checkpoint holds besides the settings: the trained module (the uncompiled
    one, so keys never gain `_orig_mod.`), its optimizer and the fp16 gradient scaler."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def checkpoint(self, epoch: int, **fields) -> dict:
        """The one checkpoint format of every training command: the state after `epoch` complete
        epochs, with `fields` (Run: the command as `kind`, its resolved `config`, the `backbone`,
        the pipeline's `stages`, `wall_s`; an interrupted epoch adds `step` and random states)."""
        return dict(format="s3l", model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                    epoch=epoch, **fields)

    def resume(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # a float again (GraphedStep made it a tensor)
            group["lr"] = float(group["lr"])
        self.scaler.load_state_dict(ckpt["scaler"])


def random_states(generator: torch.Generator) -> dict:
    """The RNG states an interrupted epoch continues from: the augmentation's and torch's own (of
    the current CUDA device only: under torchrun every process has its own)."""
    states = dict(generator=generator.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(generator: torch.Generator, states: dict) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# ----- backbones in checkpoints: ours, exports, the official S3L/MoCo/BYOL ones -------------------

# prefixes under which a backbone sits in this project's methods and in the official S3L/MoCo/BYOL
# checkpoints; the first that matches is stripped
BACKBONE_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.encoder.", "encoder.", "online.",
                     "module.")


def backbone_state(state_dict: dict) -> dict:
    """The ResNet backbone of any supported state_dict, with torchvision names and no `fc`.

    Accepts a plain ResNet state_dict (an export, a fine-tuned model) or an SSL model's (ours:
    encoder_q., encoder., online.; official: module.encoder_q., encoder_q., module.). Heads and
    queues are dropped.
    """
    for prefix in BACKBONE_PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            break
    return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def checkpoint_backbone(ckpt: dict) -> dict:
    """The backbone state_dict (torchvision names, no fc) of a loaded checkpoint: this project's
    keep the model under "model", the official S3L/MoCo ones under "state_dict", exports are plain
    state_dicts. Raises ValueError naming the keys found when it holds no ResNet."""
    state = ckpt["model"] if ckpt.get("format") == "s3l" else ckpt.get("state_dict", ckpt)
    backbone = backbone_state(state) if isinstance(state, dict) else {}
    if not isinstance(backbone.get("conv1.weight"), torch.Tensor):
        raise ValueError(f"no ResNet backbone found (expected keys like conv1.weight, "
                         f"layer1.0.conv1.weight, under one of {', '.join(BACKBONE_PREFIXES)}); "
                         f"found: {', '.join(list(ckpt)[:6])}")
    return backbone


def read_backbone(path: str):
    """(checkpoint, backbone state_dict) of the file at `path` (checkpoint_backbone), or (None,
    None) without a path: ours, an export, or an official S3L/MoCo/BYOL checkpoint."""
    if not path:
        return None, None
    ckpt = read_checkpoint(path)
    try:
        return ckpt, checkpoint_backbone(ckpt)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None


def infer_arch(state: dict):
    """(arch, conv5, small_stem) of a backbone state_dict, read off its keys and shapes."""
    arch = "resnet50" if "layer1.0.conv3.weight" in state else \
        "resnet34" if "layer3.5.conv1.weight" in state else "resnet18"
    return arch, any(k.startswith("layer4.") for k in state), state["conv1.weight"].shape[-1] == 3


def load_backbone(model: torch.nn.Module, state: dict, allow_missing=("fc.",)) -> list:
    """Load backbone weights into `model`; a partial load only where `allow_missing` says.

    state: a backbone state_dict (see backbone_state). Returns the missing keys that were allowed
    (e.g. `layer4.` when conv1-4 come from a small-architecture checkpoint). Raises ValueError
    naming the missing, unexpected or mis-shaped keys otherwise, never loading silently in part.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(tuple(allow_missing))]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(keys):
            more = f" ... ({len(keys)} in all)" if len(keys) > 6 else ""
            return ", ".join(keys[:6]) + more or "none"
        raise ValueError(f"the checkpoint does not fit this model: missing keys: {head(missing)}; "
                         f"unexpected keys: {head(unexpected)}; shape mismatches: {head(shapes)}")
    model.load_state_dict(state, strict=False)
    return [k for k in own if k not in state]


def load_pretrained(model, state: dict, path: str, keep_conv5: bool) -> None:
    """Load a backbone state into a ResNet. A conv5 that is not kept (keep_conv5=False) or not in
    the checkpoint (small architecture) starts freshly initialised, and a line says so."""
    had_conv5 = any(k.startswith("layer4.") for k in state)
    if not keep_conv5:
        state = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    allow = ("fc.",)
    if model.layer4 is not None and not (keep_conv5 and had_conv5):
        allow += ("layer4.",)
        why = "left unused" if had_conv5 else "not in the checkpoint (small architecture)"
        print(f"{path}: conv5 (layer4) {why}: it starts freshly initialised")
    try:
        load_backbone(model, state, allow)
    except ValueError as e:
        raise SystemExit(f"--pretrained {path}: {e}") from None


def export_backbone(checkpoint: str, out: str) -> None:
    """`train.py export`: a checkpoint's backbone as a plain state_dict with torchvision ResNet
    names, no fc; it loads with strict=True into models.resnetXX(num_classes=0) of the same depth.
    Never written onto its own input or onto another training checkpoint."""
    what = None
    if os.path.isdir(out) or out.endswith(os.sep):
        raise SystemExit(f"export: {out} is a folder; pass the file to write, e.g. "
                         f"{os.path.join(out, 'backbone.pt')}")
    if os.path.exists(out) and os.path.samefile(out, checkpoint):
        what = "the checkpoint it reads"
    elif os.path.isfile(out):
        try:  # any other file there may be replaced; a training checkpoint may not
            held = torch.load(out, map_location="cpu", weights_only=True)
            what = "a training checkpoint" if isinstance(held, dict) and "optimizer" in held \
                else None
        except Exception:  # noqa: BLE001 -- not a torch file: nothing to protect here
            what = None
    if what:
        raise SystemExit(f"export: {out} is {what}; writing there would destroy it: pass another "
                         "output path")
    ckpt, state = read_backbone(checkpoint)
    arch, conv5, small_stem = infer_arch(state)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    try:
        models.ARCHS[arch](conv5=conv5, small_stem=small_stem).load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise SystemExit(f"{checkpoint}: the backbone does not load into {arch}: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_checkpoint(out, state)
    size = trained_input_size(ckpt, checkpoint)
    # the resolution beside the weights (a state_dict holds tensors only): knn reads it back
    write_json(export_sidecar(out), dict(arch=arch, conv5=conv5, small_stem=small_stem,
                                         input_size=size, exported_from=checkpoint))
    print(f"wrote {len(state)} tensors of a {arch} backbone (conv5={conv5}, "
          f"small_stem={small_stem}, trained at {size} px) to {out}, and {export_sidecar(out)}")


def export_sidecar(path: str) -> str:
    """The JSON file beside an export: its architecture and the resolution it was trained at."""
    return os.path.splitext(path)[0] + ".json"


def trained_input_size(ckpt: dict, path: str):
    """The resolution a checkpoint's backbone was trained at: this project's checkpoints keep it,
    an export has it in its sidecar (export_sidecar); None for other files."""
    size = (ckpt.get("architecture") or {}).get("input_size") if ckpt.get("format") == "s3l" \
        else None
    if size is None and os.path.isfile(export_sidecar(path)):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            with open(export_sidecar(path)) as f:
                size = json.load(f).get("input_size")
    return size


# ----- several processes (torchrun) ---------------------------------------------------------------

def torchrun_ranks():
    """(rank, local rank, world size, local world size) set by torchrun, or None outside it."""
    if not all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return None
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    return tuple(int(os.environ.get(key, 1)) for key in keys)


def world_size() -> int:
    """The processes of this run: WORLD_SIZE under torchrun, else 1."""
    return (torchrun_ranks() or (0, 0, 1, 1))[2]


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def torchrun_scope():
    """Around a whole command: under torchrun only rank 0 prints (the others' stdout goes to
    /dev/null; errors still reach stderr), and the process group is left at the end, on errors
    too. Outside torchrun: nothing."""
    ranks = torchrun_ranks()
    if ranks is None:
        yield
        return
    quiet = ranks[0] != 0
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null if quiet else sys.stdout):
        try:
            yield
        finally:
            if _joined():
                dist.destroy_process_group()


def decode_wait_group(timeout: datetime.timedelta):
    """A gloo group of every process with its own timeout, for local_rank_0_first: on the default
    group (NCCL on GPUs) the other processes' wait for a long decode would end the run after NCCL's
    10-minute watchdog. Every process calls it, once the default group is joined."""
    return dist.new_group(backend="gloo", timeout=timeout)


@contextlib.contextmanager
def local_rank_0_first(group=None):
    """The block runs on each node's local rank 0 first (e.g. decoding into a cache), then on the
    node's other processes (reading that cache), which wait in a barrier of `group`
    (decode_wait_group); no process group: just the block."""
    ranks = torchrun_ranks() if _joined() else None
    local_rank = ranks[1] if ranks else None
    if local_rank:
        dist.barrier(group=group)
    yield
    if local_rank == 0:
        dist.barrier(group=group)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers on every process. Under DDP each process updates its BN running statistics
    with its own share (DDP broadcasts rank 0's at the next forward only); rank 0's are what its
    checkpoints hold, so evaluation, split over the processes, must use them too."""
    if _joined():
        for buffer in module.buffers():
            dist.broadcast(buffer, 0)


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """x averaged over the processes of torch.distributed's default group; x itself without one."""
    if not _joined():
        return x
    x = x.clone()
    dist.all_reduce(x)  # the sum
    return x / dist.get_world_size()


# ----- how the run runs: device, precision, processes (decided here, once) ------------------------
# `torchrun --nproc_per_node N train.py ...` runs train.py in N processes, RANK, LOCAL_RANK and
# WORLD_SIZE set. --batch-size stays the global batch: every step, each process trains on its
# share of the same seeded batch (Runtime.share) under DDP (Runtime.wrap). Each process draws the
# random views of the whole batch and keeps its share's, so the data order, the views and every
# RNG state are the same for any number of processes, and so are the --bn-batch groups (the same
# contiguous chunks of the batch). Rank 0 prints and writes the run folder. Decisions to stop are
# taken on values all processes share (EpochMeter), so no process waits alone in a collective.

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
    decode_wait: object = None  # torchrun: the gloo group that waits for a decode (decode_wait_group)

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
        """What the training step calls: under torchrun, DDP around `module` (gradients averaged
        over the processes in backward; its state broadcast from rank 0 here); else `module`.
        Keep `module` itself for state_dict() (no `module.` prefixes) and for evaluation."""
        if not self.distributed:
            return module
        device_ids = [self.device] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    def share(self, batch):
        """This process's rows of a global batch: a tensor (B, ...), or a dict or tuple of them,
        cut into world_size contiguous slices as evenly as possible; the batch itself in one
        process. The slices of all ranks, in rank order, are the batch."""
        if self.world_size == 1:
            return batch
        if isinstance(batch, dict):
            return {key: self.share(value) for key, value in batch.items()}
        if isinstance(batch, tuple):
            return tuple(self.share(value) for value in batch)
        return batch.tensor_split(self.world_size)[self.rank]

    def sgd(self, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
        """SGD with weight decay on every parameter, BN and biases included (as the official code),
        as one fused kernel: on CPU 11x faster than foreach for ResNet-18 (5 vs 62 ms a step,
        measured), same arithmetic."""
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


def runtime_for(args) -> Runtime:
    """The device, precision and processes every stage of the recipe (paper map) runs with, from
    the flags (setup_device); --sync-bn checked against the device."""
    runtime = setup_device(args.device, args.amp, args.channels_last, args.tf32,
                           getattr(args, "decode_timeout", 360.0))
    if getattr(args, "sync_bn", False) and runtime.device.type != "cuda":
        raise SystemExit("--sync-bn needs CUDA GPUs: torch's SyncBatchNorm has no CPU kernel")
    check_cuda_graphs(args, runtime)  # before any work, not once the run has started
    return runtime


class GraphedStep:
    """--cuda-graphs: the whole training step (forward, backward, the SGD step, the EMA update,
    MoCo's queue) captured once as a CUDA graph, then replayed, so that the host launches one graph
    a step instead of some thousand kernels (BENCHMARKS.md, "CUDA graphs for the whole step").

    step(*inputs) -> loss: the eager step (train.pretrain_step with its model and state bound);
    inputs: tensors whose shapes never change, copied into the graph's own before each replay. The
    first `warmup` calls run eagerly: they make SGD's momentum buffers and let cuDNN choose its
    algorithms, which a capture cannot. The next call captures, and every call replays; if the
    capture fails (an operation this torch cannot capture), the run stops with the first cause.
    A replay reads only tensors that keep their place: so the learning rate becomes a tensor on
    the device that s3l.set_lr fills in place (SGD's fused kernel reads it there), while a number
    the step takes from Python stays the capture's (MoCo's m and BYOL's tau: constants). A replay
    overwrites what the last one returned (the loss, the method's `outputs`): read those first.
    capture(fn) -> (fn's outputs, replay): a CUDA graph (cuda_graph_capture); tests pass a CPU
    stand-in that records the step's operations and replays them.
    """

    def __init__(self, step, optimizer: torch.optim.Optimizer, warmup: int = 3, capture=None):
        self.step, self.warmup = step, warmup
        self.capture = capture or cuda_graph_capture
        self.calls, self.inputs, self.loss, self.replay = 0, None, None, None
        for group in optimizer.param_groups:
            device = group["params"][0].device  # CUDA's kernel reads a float32 lr, the CPU's fp64
            dtype = torch.float32 if device.type == "cuda" else torch.float64
            group["lr"] = torch.tensor(float(group["lr"]), dtype=dtype, device=device)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.warmup or self.replay is False:
            return self.step(*inputs)
        if self.replay is None:
            self.inputs = [x.clone() for x in inputs]  # clone keeps channels_last
            try:
                self.loss, self.replay = self.capture(lambda: self.step(*self.inputs))
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
            for static, x in zip(self.inputs, inputs):
                static.copy_(x)
        self.replay()
        return self.loss


def cuda_graph_capture(fn):
    """fn's work captured as a CUDA graph (nothing runs yet): returns (fn's outputs, the graph's
    replay), which runs it again on the same tensors."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


def graphed_step(args, runtime: Runtime, step, optimizer: torch.optim.Optimizer,
                 warmup: int = 3):
    """The step the loop calls: `step` itself, or with --cuda-graphs a GraphedStep (captured after
    `warmup` eager steps), where one can be captured (check_cuda_graphs)."""
    if not args.cuda_graphs:
        return step
    check_cuda_graphs(args, runtime)
    return GraphedStep(step, optimizer, warmup)


def check_cuda_graphs(args, runtime: Runtime) -> None:
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


# ----- evaluation over the processes -------------------------------------------------------------

@torch.no_grad()
def centre_view_outputs(fn, store, input_size: int, runtime: Runtime,
                        batch_size: int = 256) -> torch.Tensor:
    """fn(centre views) for every image of `store`, in order: (N, ...). Under torchrun each process
    computes one contiguous share (the last padded with copies of the last image) and the shares
    are gathered, so every process holds the same result."""
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
    if _joined():  # every process's share, in rank order
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


# ----- records ------------------------------------------------------------------------------------

def git_commit() -> str:
    """The commit the code runs from, if it runs from a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def line_start() -> str:
    """How a progress line begins: "\r" on a terminal (it overwrites the last one), a new line in a
    file or pipe (where "\r" would run every line of an epoch together)."""
    return "\r" if sys.stdout.isatty() else "\n"


# what an epoch's line shows (log.jsonl keeps every measure): the loss, the pace, one health figure
SHOWN = ("epoch", "loss", "loss_of_finite_steps", "nonfinite_steps", "lr", "epoch_s",
         "images_per_s", "rank", "knn_top1", "test_top1")


def json_safe(x):
    """NaN and infinities become None (JSON's null), so every record stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


class RunLog:
    """A run folder that describes itself: config.json (the resolved settings, torch version,
    device, commit), log.jsonl (one record per epoch) and summary.json. A resumed run drops the
    records of the epochs it redoes. A loss far above the first epoch's is flagged.
    writes=False (every process but rank 0 under torchrun): the same calls, nothing written."""

    def __init__(self, save_dir: str, config: dict, resume_epoch=None, writes: bool = True,
                 stop_diverging: bool = False, chance: float = None):
        """stop_diverging: a loss over 100x the first epoch's stops the run (the supervised
        stages); else a warning (pretraining, where BYOL's loss may rise and fall). chance: a
        classifier's loss at chance, ln(classes): a first epoch far above it is warned about."""
        self.save_dir, self.first_loss, self.log_file = save_dir, None, None
        self.first_record, self.chance = True, chance
        self.stop_diverging = stop_diverging
        if not writes:
            return
        os.makedirs(save_dir, exist_ok=True)
        config = dict(config, torch=torch.__version__, git_commit=git_commit())
        path = os.path.join(save_dir, "log.jsonl")
        kept = []
        if resume_epoch is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("epoch", 0) <= resume_epoch]
        write_json(os.path.join(save_dir, "config.json"), config)
        try:
            self.log_file = open(path, "w")
            self.log_file.writelines(kept)
        except OSError as e:
            raise write_failed(path, e, "--save-dir") from None
        print("config: " + json.dumps({k: v for k, v in config.items() if v is not None}))

    def check(self, record: dict) -> None:
        """A loss over 10x the first epoch's: a warning; over 100x with stop_diverging, the end of
        the run (exit status 1) before this epoch is saved. (The linear probe's lr 10 on raw
        features swings by 1-30x between epochs and still converges once lr steps down.)"""
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return
        if self.first_loss is None:
            self.first_loss = loss
            if self.chance and loss > 2 * self.chance:  # measured: 7.0 against 2.3 ends at chance
                print(f"\nwarning: the first epoch's loss ({loss:.3g}) is {loss / self.chance:.1f}x "
                      f"the loss at chance (ln of the classes: {self.chance:.3g}): the learning "
                      "rate is likely too high for this setup; try a 10x lower --lr")
            return
        ratio = abs(loss) / max(abs(self.first_loss), 1e-12)
        what = f"the loss ({loss:.4g}) is {ratio:.0f}x the first epoch's ({self.first_loss:.4g})"
        if self.stop_diverging and ratio > 100:
            raise NonFiniteLoss(f"\nerror: {what}: training diverges. Lower --lr; this epoch was "
                                "not saved, the last checkpoint is unchanged.")
        if ratio > 10:
            print(f"\nwarning: {what}: training may be diverging (try a lower --lr)")

    def record(self, record: dict) -> None:
        if self.log_file is None:
            return
        try:
            self.log_file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            self.log_file.flush()
        except OSError as e:
            raise write_failed(self.log_file.name, e, "--save-dir") from None
        shown = {k: v for k, v in record.items() if k in SHOWN and not (
            k == "nonfinite_steps" and v == 0)} if "epoch" in record else record
        if self.first_record and "epoch" in record:
            self.first_record = False
            shown["(every measure"] = f"{self.log_file.name})"
        print(line_start() + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in shown.items()) + " " * 10)

    def summary(self, summary: dict) -> None:
        if self.log_file is None:
            return
        write_json(os.path.join(self.save_dir, "summary.json"), summary)
        self.log_file.close()


def write_json(path: str, value: dict) -> None:
    """`value` as strict JSON at `path`, atomically (a temp file, then a rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(json_safe(value), f, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise write_failed(path, e, "--save-dir") from None


class NonFiniteLoss(SystemExit):
    """Raised by EpochMeter: the run stops (exit status 1) without writing a checkpoint."""


class EpochMeter:
    """One epoch's running loss, summed on the device and read back only every `print_freq` steps
    (so the loop never waits for the device), with the progress line.

    Non-finite losses are counted, not summed. With fp16 the gradient scaler skips such steps, which
    is normal now and then; a whole read-back window of non-finite losses stops the run.
    """

    def __init__(self, epoch: int, epochs: int, steps: int, batch_size: int, images: int,
                 print_freq: int, device: torch.device, first_step: int = 0, sums=(0.0, 0.0),
                 causes: str = "the learning rate (--lr)", pace=(0, 0.0), seconds: float = 0.0):
        """first_step, sums, seconds: where an interrupted epoch stopped, its (loss sum, finite
        count) and the seconds it had run. causes: this run's settings that can make a loss
        non-finite, for the error. pace: (images, seconds) of this process's earlier epochs."""
        self.epoch, self.epochs, self.steps, self.batch_size = epoch, epochs, steps, batch_size
        self.images, self.print_freq, self.first_step = images, print_freq, first_step
        self.causes = causes
        self.loss_sum = torch.tensor(float(sums[0]), device=device)
        self.finite = torch.tensor(float(sums[1]), device=device)
        self.finite_seen, self.recent, self.t0 = sums[1], [], time.time()
        self.pace, self.seconds_before = pace, seconds
        self.step_done = first_step  # steps of this epoch finished so far

    def add(self, step: int, loss: torch.Tensor, lr: float, stop: bool = False) -> bool:
        """Count the step's loss; returns whether to stop now for an interrupt (`stop`: this
        process was asked). One process: at once. Under torchrun: at the read-back, when any
        process was asked, so that all of them stop after the same step (a process that stopped
        alone would leave the others waiting in their next collective)."""
        loss, self.lr = loss.detach().float(), lr
        ok = torch.isfinite(loss)
        self.loss_sum += torch.where(ok, loss, 0.0)
        self.finite += ok
        self.step_done = step + 1
        several = _joined()
        if (step + 1) % self.print_freq and step + 1 != self.steps:
            return stop and not several
        # one sync; under torchrun the means over the processes, so every process reads the same
        # values and takes the same decisions (the non-finite check below, the interrupt)
        values = torch.stack([self.loss_sum, self.finite, loss, loss.new_tensor(float(stop))])
        loss_sum, finite, last, asked = mean_over_processes(values).tolist()
        self.check(step, last, finite)
        done = min((step + 1 - self.first_step) * self.batch_size, self.images)
        rate = done / (time.time() - self.t0)
        # the eta from the pace of the whole run so far (evaluations included), not this epoch's
        pace = (self.pace[0] + done) / (self.pace[1] + time.time() - self.t0)
        left = (self.epochs - self.epoch) * self.images - done - self.first_step * self.batch_size
        print(f"{line_start()}epoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.steps} "
              f"loss {loss_sum / max(finite, 1):.4f} lr {self.lr:.4g} {rate:.0f} img/s eta "
              f"{left / pace / 60:.1f} min   ", end="", flush=True)
        return asked > 0

    def check(self, step: int, last_loss: float, finite: float) -> None:
        """Stop when no loss since the last read-back was finite."""
        self.recent = (self.recent + [last_loss])[-5:]
        if finite == self.finite_seen:
            raise NonFiniteLoss(
                f"\nerror: the loss is not finite at epoch {self.epoch + 1} step {step + 1} (last "
                f"losses read back: {', '.join(f'{x:.4g}' for x in self.recent)}). Settings of "
                f"this run that can cause it: {self.causes}. Nothing was saved for this epoch; the "
                "last checkpoint is unchanged.")
        self.finite_seen = finite

    def sums(self) -> tuple:
        """(loss sum, finite count) so far, to store with an interrupted epoch's checkpoint; under
        torchrun their means over the processes (a collective: every process calls it), which
        any number of processes resumes from."""
        return tuple(mean_over_processes(torch.stack([self.loss_sum, self.finite])).tolist())

    def record(self) -> dict:
        """The epoch's log record: the mean loss, the count of non-finite steps (the loss is then
        NaN, written null, and the finite steps' mean is given beside it, never in its place), the
        last lr, seconds, images/s."""
        seconds = time.time() - self.t0
        loss_sum, finite = self.sums()
        done = (self.steps - self.first_step) * self.images / self.steps
        nonfinite = round(self.steps - finite)
        record = dict(epoch=self.epoch + 1, loss=loss_sum / finite if finite else float("nan"),
                      nonfinite_steps=nonfinite, lr=self.lr,
                      epoch_s=round(self.seconds_before + seconds, 2),  # a resumed one: both parts
                      images_per_s=round(done / seconds, 1))
        if nonfinite:
            record.update(loss=float("nan"), loss_of_finite_steps=loss_sum / max(finite, 1))
        return record


def check_finite_weights(module: torch.nn.Module, epoch: int,
                         causes: str = "the learning rate (--lr)") -> None:
    """Stop before a checkpoint would save weights that hold NaN or inf; causes: as EpochMeter's."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLoss(f"\nerror: after epoch {epoch} the weights hold NaN or inf "
                            f"({', '.join(bad[:3])}, ...): not saved. Settings of this run that "
                            f"can cause it: {causes}. The last checkpoint is unchanged.")


class Interrupt:
    """A context in which SIGINT (Ctrl-C) and SIGTERM set `requested` instead of killing the
    process, so the training loop can finish its step, write a checkpoint and exit. A second Ctrl-C
    stops at once, unless repeat_stops=False: torchrun passes a Ctrl-C on to its processes, which
    got it already. Leaving the context, by an exception too, restores the previous handlers."""

    def __init__(self, repeat_stops: bool = True):
        self.requested, self.repeat_stops, self.previous = False, repeat_stops, {}
        self.exit_status = 130  # 128 + the signal's number, as the shell reports a killed process

    def __enter__(self) -> "Interrupt":
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.requested and self.repeat_stops:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested, self.exit_status = True, 128 + signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint")


# ----- resuming: after a finished epoch, or an interrupted one ------------------------------------

# settings that do not change what a run computes; every other flag must match on --resume
NOT_DEFINING = {"resume", "force_resume", "start_over", "save_dir", "device", "amp", "tf32",
                "channels_last", "compile", "print_freq", "save_every", "eval_every", "knn_every",
                "knn_k", "knn_t", "knn_train", "knn_val", "test_split", "workers", "cache_dir",
                "decode_timeout"}


# settings that decide the shapes of the weights: a resumed run can never change them
SHAPE_DEFINING = {"arch", "conv5", "small_stem", "method", "dim", "head", "moco_k",
                  "byol_hidden_dim", "byol_predictor"}


def files_digest(paths) -> str:
    """A short hash of the training files, stored in checkpoints: --resume checks the file list."""
    text = "\n".join(map(str, paths))
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def resume_checkpoint(path, command: str, method: str = None, epochs: int = None):
    """The --resume checkpoint at `path` (None: a fresh run), if it is one of `command` (and
    `method`); else one line saying what it is and which command takes it. A run that finished
    its `epochs` says so and exits 0 before anything is written: its results stay as they are."""
    if not path:
        return None
    ckpt = read_checkpoint(path)
    kind, config = ckpt.get("kind"), ckpt.get("config", {})
    if ckpt.get("format") != "s3l" or "optimizer" not in ckpt:
        raise SystemExit(f"--resume {path} is not a training checkpoint of s3l (an export, "
                         "a linear probe on cached features or another project's file): pass it as "
                         "--pretrained to finetune, warmup-conv5, linear or knn")
    if kind != command or config.get("method") != method:
        what = f"{kind} --method {config['method']}" if config.get("method") else kind
        raise SystemExit(f"--resume {path} is a checkpoint of `train.py {what}`: resume it "
                         f"with that command (or start from it with --pretrained / --init-from)")
    if epochs is not None and ckpt["epoch"] >= epochs and "step" not in ckpt:
        summary = os.path.join(os.path.dirname(path), "summary.json")
        if not os.path.exists(summary):  # stopped between its last checkpoint and its summary
            raise SystemExit(f"--resume {path}: this run trained all its {ckpt['epoch']} epochs "
                             "but wrote no summary.json; its per-epoch results are in log.jsonl "
                             "beside it, and --pretrained or --init-from can start from it")
        print(f"--resume {path}: this run already finished its {ckpt['epoch']} epochs; nothing "
              f"to do, nothing changed (its results: {summary}). To train longer, pass a larger "
              "--epochs with --force-resume")
        raise SystemExit(0)
    return ckpt


def check_resume(path: str, ckpt: dict, settings: dict, train_files, world_size: int,
                 force: bool = False) -> None:
    """A resumed run must be the checkpoint's run: the same training files and every setting that
    defines it (all of `settings` but NOT_DEFINING); a difference exits listing it (force, as
    --force-resume: goes on). Another number of processes continues the same run (same batches,
    views and BN groups)."""
    old = dict(ckpt["config"], train_files=ckpt.get("train_files"))
    new = dict(settings, train_files=files_digest(train_files))
    diffs = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in sorted(new)
             if k not in NOT_DEFINING and old.get(k) != new[k]]
    shaped = [d for d in diffs if d.split()[0] in SHAPE_DEFINING]
    if shaped:
        raise SystemExit(f"--resume {path}: this run would build another model than the "
                         f"checkpoint's ({'; '.join(shaped)}): its weights cannot continue it, "
                         "not even with --force-resume. Use the checkpoint's settings")
    if diffs and not force:
        raise SystemExit(f"--resume {path}: this run differs from the checkpoint's in "
                         f"{'; '.join(diffs)}. Use the checkpoint's settings, or pass "
                         "--force-resume to continue anyway")
    if diffs:
        print(f"--force-resume: continuing although {'; '.join(diffs)}")
    if ckpt.get("world_size", 1) != world_size:
        print(f"--resume: {ckpt.get('world_size', 1)} process(es) wrote the checkpoint, "
              f"{world_size} continue it: the same batches, views and --bn-batch groups; "
              "a BN group of a whole process (--bn-batch 0) and per-process negatives "
              "(--simclr-local-negatives) change size")


def epoch_order(seed: int, epoch: int, n: int, generator, device) -> torch.Tensor:
    """Re-seed the epoch's random streams from (seed, epoch) and return its data order, (n,) on
    `device`: a run resumed at an epoch boundary draws exactly what the uninterrupted run drew, with
    no RNG state to carry in the checkpoint."""
    s = seed * 1_000_003 + epoch
    torch.manual_seed(s)  # the global RNG: MoCo's shuffle-BN, mixup
    generator.manual_seed(s)  # the augmentation's
    return torch.randperm(n, generator=torch.Generator().manual_seed(s)).to(device)


# ----- a training loop's bookkeeping, behind one object -------------------------------------------

class Run:
    """What every training loop of train.py does besides its maths, behind a handful of calls:

        with runs.Run(...) as run:
            for epoch in run.epochs():             # seeded order, meter; --resume's start
                for step in run.steps():
                    idx = run.batch(step)          # this step's images, of all processes
                    ...views, loss, backward, SGD...
                    run.step_done(step, loss, lr)  # meter; Ctrl-C: save mid-epoch and exit
                record = run.epoch_record()        # loss, lr, speed; rank 0's BN statistics
                ...evaluation into record...
                run.save_epoch(record)             # finite weights, checkpoint, log line

    It holds the run log (config.json, log.jsonl), the TrainState, where the run starts (resumed,
    mid-epoch too: the step, random states and loss sums), each epoch's order and the views'
    generator, the meter, the interrupt, and this stage's record for cost accounting. A loop
    resumed mid-epoch draws exactly what the uninterrupted one drew.

    resumed: the --resume checkpoint or None. fields: what every checkpoint carries (kind, config,
    backbone, train_files). stages: the pipeline's earlier stages; stage: this one's record (epochs,
    macs_per_image, images_per_epoch, ...; wall_s is added). results: values that the checkpoints
    carry and save_epoch updates (the supervised stages' test top-1). order_device: where each
    epoch's order lies (the store's index_device: a store in host memory takes host indices).
    """

    def __init__(self, runtime: Runtime, state: TrainState, log: RunLog, resumed, *,
                 save_dir: str, save_every: int, seed: int, epochs: int, steps: int,
                 batch_size: int, images: int, print_freq: int, fields: dict, stages: list,
                 stage: dict, results: dict = None, causes: str = "the learning rate (--lr)",
                 order_device: torch.device = None):
        self.runtime, self.state, self.log, self.causes = runtime, state, log, causes
        self.save_dir, self.save_every, self.seed, self.print_freq = (save_dir, save_every, seed,
                                                                      print_freq)
        self.num_epochs, self.num_steps, self.batch_size, self.images = (epochs, steps,
                                                                         batch_size, images)
        self.fields, self.stages, self.stage = fields, stages, stage
        self.order_device = order_device or runtime.device  # the store's index_device
        self.results = dict(results or {})
        if resumed:
            state.resume(resumed)
        self.start = dict(epoch=resumed["epoch"], step=resumed.get("step", 0),
                          wall_s=resumed["wall_s"], rng=resumed.get("rng"),
                          sums=resumed.get("sums", (0.0, 0.0)),
                          epoch_s=resumed.get("epoch_s", 0.0)) if resumed else \
            dict(epoch=0, step=0, wall_s=0.0)
        self.loop_t0, self.trained = None, 0  # this process's pace, for the eta
        self.t0 = time.time() - self.start["wall_s"]  # the run's clock, the resumed part included
        self.generator = torch.Generator(runtime.device)  # the views' random stream
        self.interrupt = Interrupt(repeat_stops=not runtime.distributed)
        self.epoch, self.order, self.meter = self.start["epoch"], None, None

    def __enter__(self) -> "Run":
        self.interrupt.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.interrupt.__exit__(*exc)

    def epochs(self):
        """The epochs left, from 0 or --resume's; each gets its seeded order and a meter (an
        interrupted epoch continues its random streams and loss sums)."""
        for epoch in range(self.start["epoch"], self.num_epochs):
            self.epoch = epoch
            self.order = epoch_order(self.seed, epoch, self.images, self.generator,
                                     self.order_device)
            inside = epoch == self.start["epoch"] and self.start["step"]
            if inside:
                set_random_states(self.generator, self.start["rng"])
            if self.loop_t0 is None:
                self.loop_t0 = time.time()
            pace = (self.trained, time.time() - self.loop_t0)
            self.meter = EpochMeter(epoch, self.num_epochs, self.num_steps, self.batch_size,
                                    self.stage["images_per_epoch"], self.print_freq,
                                    self.runtime.device, *((self.start["step"],
                                                            self.start["sums"]) if inside else
                                                           (0, (0.0, 0.0))), causes=self.causes,
                                    pace=pace, seconds=self.start["epoch_s"] if inside else 0.0)
            yield epoch
            self.trained += (self.num_steps - self.meter.first_step) * self.batch_size

    def steps(self) -> range:
        return range(self.meter.first_step, self.num_steps)

    def batch(self, step: int) -> torch.Tensor:
        """The image indices of step `step` of this epoch, (B,), of all processes."""
        return self.order[step * self.batch_size:(step + 1) * self.batch_size]

    def step_done(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Count the step's loss (read back every print_freq steps). After Ctrl-C or SIGTERM: save
        the interrupted epoch (the step, loss sums and random states), say how to continue, exit
        130 (SIGINT) or 143 (SIGTERM). Under torchrun every process stops after the same step
        (EpochMeter.add)."""
        if not self.meter.add(step, loss, lr, stop=self.interrupt.requested):
            return
        # meter.sums() is a collective: every process calls it, before rank 0 writes
        self.save(self.epoch, step=self.meter.step_done, sums=self.meter.sums(),
                  rng=random_states(self.generator),
                  epoch_s=self.meter.seconds_before + time.time() - self.meter.t0)
        path = os.path.join(self.save_dir, "checkpoint.pt")
        print(f"\ninterrupted in epoch {self.epoch + 1} after step {self.meter.step_done}: saved "
              f"{path}. Continue with the same command and --resume {path}")
        raise SystemExit(self.interrupt.exit_status)

    def epoch_record(self) -> dict:
        """The epoch's log record (mean loss, lr, seconds, images/s), once every process holds
        rank 0's buffers: what the checkpoint saves and evaluation uses (broadcast_buffers)."""
        record = self.meter.record()
        broadcast_buffers(self.state.model)
        return record

    def save_epoch(self, record: dict, **results) -> None:
        """End of an epoch: stop if the weights are not finite or the loss diverges (RunLog.check),
        write the checkpoint (results updated), and only then log `record`."""
        self.results.update(results)
        check_finite_weights(self.state.model, self.epoch + 1, self.causes)
        self.log.check(record)
        self.save(self.epoch + 1)
        self.log.record(record)

    def save(self, epoch: int, **extra) -> None:
        """checkpoint.pt (rank 0 only) after `epoch` complete epochs, and every save_every epochs a
        numbered copy as the official code keeps (checkpoint_0020.pt, ...)."""
        if not self.runtime.is_main:
            return
        ckpt = self.state.checkpoint(epoch, **self.fields, stages=self.all_stages(),
                                     wall_s=self.wall_s(), world_size=self.runtime.world_size,
                                     **self.results, **extra)
        save_checkpoint(os.path.join(self.save_dir, "checkpoint.pt"), ckpt)
        if epoch % self.save_every == 0 and "step" not in extra:
            save_checkpoint(os.path.join(self.save_dir, f"checkpoint_{epoch:04d}.pt"), ckpt)

    def wall_s(self) -> float:
        return time.time() - self.t0

    def all_stages(self) -> list:
        """The pipeline's stages with this one's record so far last (--resume replaces it)."""
        return self.stages + [dict(self.stage, wall_s=round(self.wall_s(), 1))]


def health_monitor(args, runtime: Runtime, steps: int, group: int, lr_for_batch: int = None):
    """The label-free health measures of this run (health.py), or None with --no-health.
    lr_for_batch: the batch that --lr was set for, when it is another than this run's."""
    if not args.health:
        return None
    scale = args.simclr_t / args.simclr_base_t if args.method == "simclr" else 1.0
    candidates = args.batch_size // (runtime.world_size if args.simclr_local_negatives else 1)
    set_for = f", the method's default, set for batch {lr_for_batch}" if lr_for_batch else ""
    causes = f"--lr {args.lr:g} (too high or too low{set_for}); " + \
        (f"--byol-tau {args.byol_tau:g} (BYOL: 0.99-0.996); " if args.method == "byol" else "") + \
        f"--batch-size {args.batch_size} in BN groups of {group} (--bn-batch: too small groups " \
        f"leak; BYOL needs BN); {runtime.precision_cause()}"
    return health.HealthMonitor(args.method, health.chance_loss(
        args.method, candidates, args.moco_k, scale), args.print_freq, steps, causes)


# ----- cost accounting: what bench.py and study.py count -----------------------------------------

# Backbone passes per training image, in forward-pass units (a backward costs two forwards): MoCo v2
# trains the query encoder on one view and runs the key encoder on the other (3 + 1); SimCLR trains
# on both views (2 x 3); BYOL trains the online network on both views and runs the target on both
# (2 x 3 + 2); fine-tuning 3; the linear probe runs the frozen backbone forward (its fc is ignored).
# Heads and projectors are not counted: small next to the backbone. FLOPs = 2 x macs() x PASSES.
PASSES = {"moco": 4, "simclr": 6, "byol": 8, "finetune": 3, "linear": 1}
