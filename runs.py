"""The run folder of a training command: one run at a time (a lock, a run id), records that are
always valid JSON, the epoch meter, interrupts, and Run: the bookkeeping every loop of train.py
shares, so that the loops read like the paper (S3L, arXiv 2103.13559). Nothing here is specific to
a method.
"""
import json
import math
import os
import signal
import socket
import subprocess
import time

import torch

import checkpoints
import devices


LOCK_NAME = ".lock"


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
    """Take save_dir/.lock (pid and host inside), or exit if another live run holds it (two runs
    would mix their files). A dead process's lock is taken over; leftover temp files removed."""
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
                              devices.pid_alive(int(pid))):
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
            raise checkpoints.write_failed(path, e, "--save-dir",
                                           lost="Nothing was started.") from None
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
        if inside or held is not None and held == checkpoints.checkpoint_run_id(resume):
            return
        raise SystemExit(f"--save-dir {save_dir} holds another run's results ({', '.join(results)})"
                         f", not the run of --resume {resume}: continue that run in its own folder "
                         f"(drop --save-dir, or pass --save-dir {os.path.dirname(resume) or '.'}) "
                         "or pass an empty --save-dir")
    if not start_over:
        resume = f"continue it with --resume {save_dir}/checkpoint.pt, " if "checkpoint.pt" in \
            results else ""  # an evaluation (knn) has no checkpoint to continue
        raise SystemExit(f"--save-dir {save_dir} holds another run's results ({', '.join(results)})"
                         f": {resume}keep it and pass another --save-dir, or pass --start-over to "
                         "move its files aside")
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


def git_commit() -> str:
    """The commit the code runs from, if it runs from a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# what an epoch's line shows (log.jsonl keeps every measure): the loss, the pace, one health figure
SHOWN = ("epoch", "loss", "loss_of_finite_steps", "nonfinite_steps", "lr", "epoch_s",
         "images_per_s", "rank", "knn_top1", "test_top1")


class RunLog:
    """A run folder that describes itself: config.json (the resolved settings, torch version,
    device, commit), log.jsonl (one record per epoch) and summary.json. A resumed run drops the
    records of the epochs it redoes. A loss far above the first epoch's is flagged.
    writes=False (every process but rank 0 under torchrun): the same calls, nothing written."""

    def __init__(self, save_dir: str, config: dict, resume_epoch=None, writes: bool = True,
                 stop_diverging: bool = False, chance: float = None):
        """stop_diverging, chance: see check."""
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
        checkpoints.write_json(os.path.join(save_dir, "config.json"), config)
        try:
            self.log_file = open(path, "w")
            self.log_file.writelines(kept)
        except OSError as e:
            raise checkpoints.write_failed(path, e, "--save-dir") from None
        print("config: " + json.dumps({k: v for k, v in config.items() if v is not None}))

    def check(self, record: dict) -> None:
        """A loss over 10x the first epoch's: a warning; over 100x with stop_diverging (the
        supervised stages; BYOL's loss may rise and fall), the end of the run (exit status 1) before
        this epoch is saved. A first epoch over 2x `chance` (a classifier's ln(classes)): a
        warning. (The linear probe's lr 10 swings by 1-30x between epochs and still converges.)"""
        loss = record.get("loss")
        if loss is None or not math.isfinite(loss):
            return
        if self.first_loss is None:
            self.first_loss = loss
            if self.chance and loss > 2 * self.chance:  # measured: 7.0 against 2.3 ends at chance
                print(f"\nwarning: the first epoch's loss ({loss:.3g}) is "
                      f"{loss / self.chance:.1f}x the loss at chance (ln of the classes: "
                      f"{self.chance:.3g}): the learning rate is likely too high for this setup; "
                      "try a 10x lower --lr")
            return
        ratio = abs(loss) / max(abs(self.first_loss), 1e-12)
        what = f"the loss ({loss:.4g}) is {ratio:.0f}x the first epoch's ({self.first_loss:.4g})"
        if self.stop_diverging and ratio > 100:
            raise checkpoints.NonFiniteLoss(f"\nerror: {what}: training diverges. Lower --lr; "
                                            "this epoch was not saved, the last checkpoint is "
                                            "unchanged.")
        if ratio > 10:
            print(f"\nwarning: {what}: training may be diverging (try a lower --lr)")

    def record(self, record: dict) -> None:
        if self.log_file is None:
            return
        try:
            self.log_file.write(json.dumps(checkpoints.json_safe(record), allow_nan=False) + "\n")
            self.log_file.flush()
        except OSError as e:
            raise checkpoints.write_failed(self.log_file.name, e, "--save-dir") from None
        shown = {k: v for k, v in record.items() if k in SHOWN and not (
            k == "nonfinite_steps" and v == 0)} if "epoch" in record else record
        if self.first_record and "epoch" in record:
            self.first_record = False
            shown["(every measure"] = f"{self.log_file.name})"
        print(devices.line_start() + "  ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in shown.items()) +
            " " * 10)

    def summary(self, summary: dict) -> None:
        if self.log_file is None:
            return
        checkpoints.write_json(os.path.join(self.save_dir, "summary.json"), summary)
        self.log_file.close()


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
        count) and seconds. causes: for the error. pace: (images, seconds) of earlier epochs."""
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
        several = devices.joined()
        if (step + 1) % self.print_freq and step + 1 != self.steps:
            return stop and not several
        # one sync; under torchrun the means over the processes, so every process reads the same
        # values and takes the same decisions (the non-finite check below, the interrupt)
        values = torch.stack([self.loss_sum, self.finite, loss, loss.new_tensor(float(stop))])
        loss_sum, finite, last, asked = devices.mean_over_processes(values).tolist()
        self.check(step, last, finite)
        done = min((step + 1 - self.first_step) * self.batch_size, self.images)
        rate = done / (time.time() - self.t0)
        # the eta from the pace of the whole run so far (evaluations included), not this epoch's
        pace = (self.pace[0] + done) / (self.pace[1] + time.time() - self.t0)
        left = (self.epochs - self.epoch) * self.images - done - self.first_step * self.batch_size
        print(f"{devices.line_start()}epoch {self.epoch + 1}/{self.epochs} step {step + 1}/"
              f"{self.steps} loss {loss_sum / max(finite, 1):.4f} lr {self.lr:.4g} {rate:.0f} "
              f"img/s eta {left / pace / 60:.1f} min   ", end="", flush=True)
        return asked > 0

    def check(self, step: int, last_loss: float, finite: float) -> None:
        """Stop when no loss since the last read-back was finite."""
        self.recent = (self.recent + [last_loss])[-5:]
        if finite == self.finite_seen:
            raise checkpoints.NonFiniteLoss(
                f"\nerror: the loss is not finite at epoch {self.epoch + 1} step {step + 1} (last "
                f"losses read back: {', '.join(f'{x:.4g}' for x in self.recent)}). Settings of "
                f"this run that can cause it: {self.causes}. Nothing was saved for this epoch; the "
                "last checkpoint is unchanged.")
        self.finite_seen = finite

    def sums(self) -> tuple:
        """(loss sum, finite count) so far, for an interrupted epoch's checkpoint; under torchrun
        their means over the processes (a collective: every process calls it)."""
        sums = torch.stack([self.loss_sum, self.finite])
        return tuple(devices.mean_over_processes(sums).tolist())

    def record(self) -> dict:
        """The epoch's log record: mean loss, non-finite steps (the loss is then NaN, written
        null, the finite steps' mean beside it, never in its place), last lr, seconds, images/s."""
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


class Interrupt:
    """A context in which SIGINT (Ctrl-C) and SIGTERM set `requested` instead of killing the
    process, so the loop can finish its step, save and exit. A second Ctrl-C stops at once, unless
    repeat_stops=False (torchrun passes a Ctrl-C on to its processes, which got it already)."""

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


def epoch_order(seed: int, epoch: int, n: int, generator, device) -> torch.Tensor:
    """Re-seed the epoch's random streams from (seed, epoch) and return its data order, (n,) on
    `device`: a run resumed at an epoch boundary draws exactly what the uninterrupted run drew, with
    no RNG state to carry in the checkpoint."""
    s = seed * 1_000_003 + epoch
    torch.manual_seed(s)  # the global RNG: MoCo's shuffle-BN, mixup
    generator.manual_seed(s)  # the augmentation's
    return torch.randperm(n, generator=torch.Generator().manual_seed(s)).to(device)


class Run:
    """What every training loop of train.py does besides its maths, behind a handful of calls:

        with Run(...) as run:
            for epoch in run.epochs():             # seeded order, meter; --resume's start
                for step in run.steps():
                    idx = run.batch(step)          # this step's images, of all processes
                    ...views, loss, backward, SGD...
                    run.step_done(step, loss, lr)  # meter; Ctrl-C: save mid-epoch and exit
                record = run.epoch_record()        # loss, lr, speed; rank 0's BN statistics
                ...evaluation into record...
                run.save_epoch(record)             # finite weights, checkpoint, log line

    A loop resumed mid-epoch draws exactly what the uninterrupted one drew. resumed: the --resume
    checkpoint or None. fields: what every checkpoint carries (kind, config, backbone, train_files).
    stages: the pipeline's earlier stages; stage: this one's record for cost accounting (wall_s is
    added). results: values the checkpoints carry and save_epoch updates (test top-1).
    order_device: where each epoch's order lies (the store's index_device).
    """

    def __init__(self, runtime: devices.Runtime, state: checkpoints.TrainState, log: RunLog,
                 resumed, *, save_dir: str, save_every: int, seed: int, epochs: int, steps: int,
                 batch_size: int, images: int, print_freq: int, fields: dict, stages: list,
                 stage: dict, results: dict = None, causes: str = "the learning rate (--lr)",
                 order_device: torch.device = None):
        self.runtime, self.state, self.log, self.causes = runtime, state, log, causes
        self.save_dir, self.save_every, self.seed = save_dir, save_every, seed
        self.print_freq, self.num_epochs, self.num_steps = print_freq, epochs, steps
        self.batch_size, self.images = batch_size, images
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
        """The epochs left; each gets its seeded order and a meter (an interrupted epoch continues
        its random streams and loss sums)."""
        for epoch in range(self.start["epoch"], self.num_epochs):
            self.epoch = epoch
            # reseeded from (seed, epoch): an epoch boundary needs no random state in a checkpoint
            self.order = epoch_order(self.seed, epoch, self.images, self.generator,
                                     self.order_device)
            inside = epoch == self.start["epoch"] and self.start["step"]
            if inside:
                checkpoints.set_random_states(self.generator, self.start["rng"])
            if self.loop_t0 is None:
                self.loop_t0 = time.time()
            start = (self.start["step"], self.start["sums"]) if inside else (0, (0.0, 0.0))
            self.meter = EpochMeter(epoch, self.num_epochs, self.num_steps, self.batch_size,
                                    self.stage["images_per_epoch"], self.print_freq,
                                    self.runtime.device, *start, causes=self.causes,
                                    pace=(self.trained, time.time() - self.loop_t0),
                                    seconds=self.start["epoch_s"] if inside else 0.0)
            yield epoch
            self.trained += (self.num_steps - self.meter.first_step) * self.batch_size

    def steps(self) -> range:
        return range(self.meter.first_step, self.num_steps)

    def batch(self, step: int) -> torch.Tensor:
        """The image indices of step `step` of this epoch, (B,), of all processes."""
        return self.order[step * self.batch_size:(step + 1) * self.batch_size]

    def step_done(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Count the step's loss. After Ctrl-C or SIGTERM (every process after the same step:
        EpochMeter.add): save the interrupted epoch (step, loss sums, random states), say how to
        continue, exit 130 (SIGINT) or 143 (SIGTERM)."""
        if not self.meter.add(step, loss, lr, stop=self.interrupt.requested):
            return
        # meter.sums() is a collective: every process calls it, before rank 0 writes
        self.save(self.epoch, step=self.meter.step_done, sums=self.meter.sums(),
                  rng=checkpoints.random_states(self.generator),
                  epoch_s=self.meter.seconds_before + time.time() - self.meter.t0)
        path = os.path.join(self.save_dir, "checkpoint.pt")
        print(f"\ninterrupted in epoch {self.epoch + 1} after step {self.meter.step_done}: saved "
              f"{path}. Continue with the same command and --resume {path}")
        raise SystemExit(self.interrupt.exit_status)

    def epoch_record(self) -> dict:
        """The epoch's log record (mean loss, lr, seconds, images/s), once every process holds
        rank 0's buffers: what the checkpoint saves and evaluation uses (broadcast_buffers)."""
        record = self.meter.record()
        devices.broadcast_buffers(self.state.model)
        return record

    def save_epoch(self, record: dict, **results) -> None:
        """End of an epoch: stop if the weights are not finite or the loss diverges (RunLog.check),
        write the checkpoint (results updated), and only then log `record`."""
        self.results.update(results)
        checkpoints.check_finite_weights(self.state.model, self.epoch + 1, self.causes)
        self.log.check(record)
        self.save(self.epoch + 1)
        self.log.record(record)

    def save(self, epoch: int, **extra) -> None:
        """checkpoint.pt (rank 0) after `epoch` epochs; every save_every a numbered copy, as the
        official code keeps (checkpoint_0020.pt, ...)."""
        if not self.runtime.is_main:
            return
        ckpt = self.state.checkpoint(epoch, **self.fields, stages=self.all_stages(),
                                     wall_s=self.wall_s(), world_size=self.runtime.world_size,
                                     **self.results, **extra)
        checkpoints.save_checkpoint(os.path.join(self.save_dir, "checkpoint.pt"), ckpt)
        if epoch % self.save_every == 0 and "step" not in extra:
            numbered = os.path.join(self.save_dir, f"checkpoint_{epoch:04d}.pt")
            checkpoints.save_checkpoint(numbered, ckpt)

    def wall_s(self) -> float:
        return time.time() - self.t0

    def all_stages(self) -> list:
        """The pipeline's stages with this one's record so far last (--resume replaces it)."""
        return self.stages + [dict(self.stage, wall_s=round(self.wall_s(), 1))]
