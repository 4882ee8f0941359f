"""The run folder of a training command: what it saves, and how it survives faults.

Nothing here is specific to S3L; train.py's loops use it so that they can read like the paper.

  folder       lock_run_folder, unlock_run_folder (one run per folder), check_writable_folder
  checkpoints  save_checkpoint, read_checkpoint (atomic writes, a checksum inside), TrainState
               (the one checkpoint format), write_checkpoints
  records      RunLog (config.json, log.jsonl, summary.json: always valid JSON), EpochMeter (loss
               summed on the device, the progress line, non-finite losses caught), Interrupt
               (SIGINT/SIGTERM end the current step, then the loop saves and exits)
  processes    torchrun_ranks, torchrun_scope (rank 0 prints; the group is left at the end),
               local_rank_0_first, broadcast_buffers, mean_over_processes (the meter's read-backs,
               so every process takes the same decision to stop)
"""
import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOCK_NAME = ".lock"


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


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
            if host != socket.gethostname() or not pid.isdigit() or _pid_alive(int(pid)):
                raise SystemExit(f"--save-dir {save_dir} is in use by process {pid} on {host}: "
                                 "wait for it to finish, or pass another --save-dir (if that "
                                 f"run is gone, delete {path})") from None
            print(f"{path}: process {pid} is gone, taking the folder over")
            os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        break
    for name in os.listdir(save_dir):  # temp files of a run killed mid-write
        if name.endswith(".tmp"):
            os.remove(os.path.join(save_dir, name))


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
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
    return ckpt


@dataclass
class TrainState:
    """What a training checkpoint holds besides the settings: the trained module (the uncompiled
    one, so keys never gain `_orig_mod.`), its optimizer and the fp16 gradient scaler."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def checkpoint(self, kind: str, config: dict, backbone: dict, epoch: int, wall_s: float,
                   stages: list, **extra) -> dict:
        """The one checkpoint format of every training command: `kind` is the command, `config`
        its resolved settings, `stages` the pipeline so far (cost accounting). `epoch` epochs are
        complete; an interrupted one adds `step` and the random states to continue from."""
        return dict(format="s3l", kind=kind, model=self.model.state_dict(),
                    optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
                    epoch=epoch, wall_s=wall_s, config=config, backbone=backbone,
                    stages=stages, **extra)

    def resume(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])


def write_checkpoints(save_dir: str, state: dict, save_every: int) -> None:
    """checkpoint.pt (the latest, every epoch) and, every `save_every` epochs, a numbered copy as
    the official code keeps (checkpoint_0020.pt, ...)."""
    save_checkpoint(os.path.join(save_dir, "checkpoint.pt"), state)
    if state["epoch"] % save_every == 0 and "step" not in state:
        save_checkpoint(os.path.join(save_dir, f"checkpoint_{state['epoch']:04d}.pt"), state)


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


# ----- several processes (torchrun) ---------------------------------------------------------------

def torchrun_ranks():
    """(rank, local rank, world size, local world size) set by torchrun, or None outside it."""
    if not all(key in os.environ for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return None
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    return tuple(int(os.environ.get(key, 1)) for key in keys)


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


@contextlib.contextmanager
def local_rank_0_first():
    """The block runs on each node's local rank 0 first (e.g. decoding into a cache), then on the
    node's other processes (reading that cache); no process group: just the block."""
    ranks = torchrun_ranks() if _joined() else None
    local_rank = ranks[1] if ranks else None
    if local_rank:
        dist.barrier()
    yield
    if local_rank == 0:
        dist.barrier()


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


# ----- records ------------------------------------------------------------------------------------

def git_commit() -> str:
    """The commit the code runs from, if it runs from a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


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

    def __init__(self, save_dir: str, config: dict, resume_epoch=None, writes: bool = True):
        self.save_dir, self.first_loss, self.log_file = save_dir, None, None
        if not writes:
            return
        os.makedirs(save_dir, exist_ok=True)
        config = dict(config, torch=torch.__version__, git_commit=git_commit())
        with open(os.path.join(save_dir, "config.json"), "w") as f:
            json.dump(json_safe(config), f, indent=2, allow_nan=False)
        path = os.path.join(save_dir, "log.jsonl")
        kept = []
        if resume_epoch is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("epoch", 0) <= resume_epoch]
        self.log_file = open(path, "w")
        self.log_file.writelines(kept)
        print("config: " + json.dumps({k: v for k, v in config.items() if v is not None}))

    def record(self, record: dict) -> None:
        if self.log_file is None:
            return
        loss = record.get("loss")
        if loss is not None and self.first_loss is None:
            self.first_loss = loss
        elif loss is not None and abs(loss) > 10 * abs(self.first_loss):
            print(f"\nwarning: the loss ({loss:.4g}) is over 10x the first epoch's "
                  f"({self.first_loss:.4g}): training may be diverging (try a lower --lr)")
        self.log_file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        self.log_file.flush()
        print("\r" + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in record.items()) + " " * 10)

    def summary(self, summary: dict) -> None:
        if self.log_file is None:
            return
        with open(os.path.join(self.save_dir, "summary.json"), "w") as f:
            json.dump(json_safe(summary), f, indent=2, allow_nan=False)
        self.log_file.close()


class NonFiniteLoss(SystemExit):
    """Raised by EpochMeter: the run stops (exit status 1) without writing a checkpoint."""


class EpochMeter:
    """One epoch's running loss, summed on the device and read back only every `print_freq` steps
    (so the loop never waits for the device), with the progress line.

    Non-finite losses are counted, not summed. With fp16 the gradient scaler skips such steps, which
    is normal now and then; a whole read-back window of non-finite losses stops the run.
    """

    def __init__(self, epoch: int, epochs: int, steps: int, batch_size: int, images: int,
                 print_freq: int, device: torch.device, first_step: int = 0, sums=(0.0, 0.0)):
        """first_step, sums: where an interrupted epoch stopped, its (loss sum, finite count)."""
        self.epoch, self.epochs, self.steps, self.batch_size = epoch, epochs, steps, batch_size
        self.images, self.print_freq, self.first_step = images, print_freq, first_step
        self.loss_sum = torch.tensor(float(sums[0]), device=device)
        self.finite = torch.tensor(float(sums[1]), device=device)
        self.finite_seen, self.recent, self.t0 = sums[1], [], time.time()
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
        left = (self.epochs - self.epoch) * self.images - done
        print(f"\repoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.steps} loss "
              f"{loss_sum / max(finite, 1):.4f} lr {self.lr:.4g} {rate:.0f} img/s eta "
              f"{left / rate / 60:.1f} min   ", end="", flush=True)
        return asked > 0

    def check(self, step: int, last_loss: float, finite: float) -> None:
        """Stop when no loss since the last read-back was finite."""
        self.recent = (self.recent + [last_loss])[-5:]
        if finite == self.finite_seen:
            raise NonFiniteLoss(
                f"\nerror: the loss is not finite at epoch {self.epoch + 1} step {step + 1} (last "
                f"losses read back: {', '.join(f'{x:.4g}' for x in self.recent)}). Likely causes: "
                "a learning rate too high (lower --lr), or fp16 overflow (use --amp bf16 or off). "
                "Nothing was saved for this epoch; the last checkpoint is unchanged.")
        self.finite_seen = finite

    def sums(self) -> tuple:
        """(loss sum, finite count) so far, to store with an interrupted epoch's checkpoint; under
        torchrun their means over the processes (a collective: every process calls it), which
        any number of processes resumes from."""
        return tuple(mean_over_processes(torch.stack([self.loss_sum, self.finite])).tolist())

    def record(self) -> dict:
        """The epoch's log record: mean finite loss, last lr, seconds, images/s."""
        seconds = time.time() - self.t0
        loss_sum, finite = self.sums()
        done = (self.steps - self.first_step) * self.images / self.steps
        return dict(epoch=self.epoch + 1, loss=loss_sum / finite if finite else float("nan"),
                    lr=self.lr, epoch_s=round(seconds, 2), images_per_s=round(done / seconds, 1))


def check_finite_weights(module: torch.nn.Module, epoch: int) -> None:
    """Stop before a checkpoint would save weights that hold NaN or inf."""
    bad = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLoss(f"\nerror: after epoch {epoch} the weights hold NaN or inf "
                            f"({', '.join(bad[:3])}, ...): not saved. Lower --lr, or use --amp "
                            "bf16 or off instead of fp16; the last checkpoint is unchanged.")


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM set `requested` instead of killing the process, so the training
    loop can finish its step, write a checkpoint and exit. A second Ctrl-C stops at once, unless
    repeat_stops=False: torchrun passes a Ctrl-C on to its processes, which got it already."""

    def __init__(self, repeat_stops: bool = True):
        self.requested, self.repeat_stops = False, repeat_stops
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.requested and self.repeat_stops:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint")

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
