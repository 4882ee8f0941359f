"""Checkpoints: one format for every training command, written atomically with a checksum inside,
the ResNet backbones in them (ours, exports, the official S3L/MoCo/BYOL ones), and the checks that
let --resume continue a run exactly. S3L's recipe (Cao & Wu 2021, arXiv 2103.13559) carries conv1-4
from stage to stage: pretraining at small resolution, the conv5 warm-up, fine-tuning.
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch

import devices
import models


def checkpoint_run_id(path: str):
    """The run id of a checkpoint, read without loading its tensors (mmap), or None."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 -- resume_checkpoint says what is wrong with the file
        return None
    return ckpt.get("run_id") if isinstance(ckpt, dict) else None


def state_digest(obj) -> str:
    """SHA-256 of a checkpoint's contents (tensors by their bytes, other values by repr) in key
    order: stored inside the file, it detects bytes changed after writing."""
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
                not devices.pid_alive(int(pid)):
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
    """One line for a failed write (full disk, read-only, no permission): the file, its folder's
    free space, the flag to change (`where`) and what became of the run's work (`lost`)."""
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
    """What a training checkpoint holds besides the settings: the trained module (uncompiled: no
    `_orig_mod.` keys), its optimizer and the fp16 gradient scaler."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def checkpoint(self, epoch: int, **fields) -> dict:
        """The one checkpoint format of every training command: the state after `epoch` epochs,
        with `fields` (Run's: kind, config, architecture, stages, wall_s; mid-epoch: step, rng)."""
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
    """The RNG states an interrupted epoch continues from: the augmentation's and torch's (of the
    current CUDA device only: under torchrun every process has its own)."""
    states = dict(generator=generator.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(generator: torch.Generator, states: dict) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# prefixes under which a backbone sits in this project's methods and in the official S3L/MoCo/BYOL
# checkpoints; the first that matches is stripped
BACKBONE_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.encoder.", "encoder.", "online.",
                     "module.")


def backbone_state(state_dict: dict) -> dict:
    """The ResNet backbone of a plain ResNet state_dict (an export, a fine-tuned model) or an SSL
    model's (BACKBONE_PREFIXES), with torchvision names; fc, heads and queues dropped."""
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
    """Load a backbone state_dict into `model`, in part only where `allow_missing` says (`layer4.`
    from a small-architecture checkpoint); returns those missing keys. Raises ValueError naming the
    missing, unexpected or mis-shaped keys otherwise: never a silent partial load."""
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
    names, no fc (strict=True into models.resnetXX(num_classes=0)), and its sidecar JSON. Never
    written onto its own input or onto another training checkpoint."""
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


# settings that do not change what a run computes; every other flag must match on --resume
NOT_DEFINING = {"resume", "force_resume", "start_over", "save_dir", "device", "amp", "tf32",
                "channels_last", "compile", "print_freq", "save_every", "eval_every", "knn_every",
                "knn_k", "knn_t", "knn_train", "knn_val", "test_split", "workers", "cache_dir",
                "decode_timeout", "cuda_graphs"}


# settings that decide the shapes of the weights: a resumed run can never change them
SHAPE_DEFINING = {"arch", "conv5", "small_stem", "method", "dim", "head", "moco_k",
                  "byol_hidden_dim", "byol_predictor"}


def files_digest(paths) -> str:
    """A short hash of the training files, stored in checkpoints: --resume checks the file list."""
    text = "\n".join(map(str, paths))
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def resume_checkpoint(path, command: str, method: str = None, epochs: int = None):
    """The --resume checkpoint at `path` (None: a fresh run) if it is `command`'s (and `method`'s),
    else one line saying which command takes it. A run that finished its `epochs` exits 0 before
    anything is written."""
    if not path:
        return None
    ckpt = read_checkpoint(path)
    kind, config = ckpt.get("kind"), ckpt.get("config", {})
    if ckpt.get("format") != "s3l" or "optimizer" not in ckpt:
        raise SystemExit(f"--resume {path} is not a training checkpoint of s3l (an export or "
                         "another project's file): pass it as --pretrained to finetune, "
                         "warmup-conv5, linear or knn")
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
    """A resumed run must be the checkpoint's: the same training files and every setting but
    NOT_DEFINING; a difference exits listing it (force, --force-resume: goes on, unless it changes
    a shape). Another number of processes continues the same run."""
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


def json_safe(x):
    """NaN and infinities become None (JSON's null), so every record stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


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


def check_finite_weights(module: torch.nn.Module, epoch: int,
                         causes: str = "the learning rate (--lr)") -> None:
    """Stop before a checkpoint would save weights that hold NaN or inf; causes: as EpochMeter's."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLoss(f"\nerror: after epoch {epoch} the weights hold NaN or inf "
                            f"({', '.join(bad[:3])}, ...): not saved. Settings of this run that "
                            f"can cause it: {causes}. The last checkpoint is unchanged.")
