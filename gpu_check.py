"""The first thing to run on a lent GPU (about a minute): the pretraining step against torch's
rules.

S3L (Cao & Wu 2021, arXiv 2103.13559) is cheap because its step is small; a GPU keeps it cheap only
if the host never waits for it and the per-GPU BN costs one kernel a layer. For MoCo v2, SimCLR and
BYOL (ResNet-18, 32 px, batch 64 in BN groups of 16), this prints one line per check:

  no sync         two views and a step read nothing back (CUDA: torch's sync debug mode "error";
                  CPU: no .item()/.cpu()/.tolist()/.numpy() and no tensor built from host data)
  folded BN       the folded per-GPU BN gives the chunked form's loss, and an NHWC BN layer
                  returns NHWC (no layout conversion before the next convolution)
  capture         CUDA only: the step captured as a CUDA graph (train.py --cuda-graphs); over 5
                  replays its losses stay within 10x the eager-against-eager spread (or 1e-3)
  lr in replay    CUDA only: with the lr set to 0 a replay leaves every weight as it was (set_lr
                  reaches the captured SGD), with the lr back it moves them
  state advances  CUDA only: each replay moves BN's running mean and the method's own state
                  (MoCo's queue pointer, BYOL's target)
  speed           steps/s, chunked and folded BN, eager and (CUDA) graphed

  python gpu_check.py              every method on the default device
  python gpu_check.py --device cpu --methods moco

It exits non-zero when a check fails. BENCHMARKS.md keeps what it printed on each machine.
"""
import argparse
import contextlib
import sys
import time

import torch

import augment
import checkpoints
import cli
import data
import devices
import models
import s3l
import train


def build(method: str, runtime, folded: bool, batch: int):
    """A seeded method (ResNet-18, BN groups of 16), its TrainState, and a step of train.py."""
    args = cli.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             str(batch), "--moco-k", str(4 * batch), "--bn-batch", "16",
                             "--byol-hidden-dim", "512", "--input-size", "32"])
    torch.manual_seed(0)
    model = train.build_method(args, models.resnet18())
    model = runtime.place(s3l.fold_split_batchnorm_(model, folded))
    optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
    state = checkpoints.TrainState(model, optimizer, runtime.scaler())
    return model, state, lambda v1, v2: train.pretrain_step(model, state, runtime, v1, v2)[0]


@contextlib.contextmanager
def read_backs_counted(calls: list, device: torch.device):
    """Every read-back (and, on a CPU, every tensor built from host data) inside, into `calls`;
    on CUDA, torch's sync debug mode raises at the first synchronising call."""
    patched = [(torch.Tensor, name) for name in ("item", "cpu", "tolist", "numpy")]
    patched += [(torch, name) for name in ("tensor", "as_tensor", "from_numpy")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    for owner, name, real in saved:
        setattr(owner, name, lambda *a, _n=name, _f=real, **k: (calls.append(_n), _f(*a, **k))[1])
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        for owner, name, real in saved:
            setattr(owner, name, real)


def state_of(model) -> torch.Tensor:
    """One number per kind of state a replay must move: BN's first running mean, and the method's
    queue pointer (MoCo) or the target's first weight (BYOL)."""
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    own = model.queue_ptr.float() if hasattr(model, "queue_ptr") else \
        next(model.target.parameters()).sum() if hasattr(model, "target") else bn.running_var.sum()
    return torch.stack([bn.running_mean.sum(), own.sum()]).detach().clone()


def steps_per_s(step, views, device, n: int = 10) -> float:
    for _ in range(3):
        step(*views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        loss = step(*views)
    loss.item()  # the queued steps, all done
    return n / (time.perf_counter() - t0)


def check_method(method: str, runtime, batch: int, report) -> None:
    cuda = runtime.device.type == "cuda"
    store = data.synthetic_store(4 * batch, 37, 0).to(runtime.device, 1 << 30)
    augmenter = augment.SSLAugment(32, resample_dtype=runtime.resample_dtype)
    g = torch.Generator(runtime.device).manual_seed(0)
    idx = torch.arange(batch, device=store.index_device)
    model, state, step = build(method, runtime, runtime.fold_bn, batch)
    step(*train.pretrain_views(store, idx, augmenter, g, runtime))  # warm-up: buffers, cuDNN
    calls, error = [], None
    try:
        with read_backs_counted(calls, runtime.device):
            for _ in range(2):
                step(*train.pretrain_views(store, idx, augmenter, g, runtime))
    except RuntimeError as e:  # sync debug mode
        error = str(e).splitlines()[0]
    report(method, "no sync", not calls and error is None, error or ", ".join(calls) or "none")

    views = [v.detach().clone() for v in train.pretrain_views(store, idx, augmenter, g, runtime)]
    losses = {}
    for folded in (False, True):
        model, state, step = build(method, runtime, folded, batch)
        torch.manual_seed(1)  # MoCo's key shuffle
        losses[folded] = step(*views).item()
    bn = s3l.SplitBatchNorm(64, 4, folded=True).to(runtime.device)
    nhwc = bn(torch.randn(64, 64, 8, 8, device=runtime.device).contiguous(
        memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    gap = abs(losses[True] - losses[False])
    report(method, "folded BN", gap <= 1e-3 * abs(losses[False]) + 1e-4 and nhwc,
           f"loss chunked {losses[False]:.5f} folded {losses[True]:.5f}, NHWC kept: {nhwc}")

    if cuda:
        check_capture(method, runtime, batch, views, report)
    rates = []
    for folded in (False, True):
        for graphed in (False, True) if cuda else (False,):
            model, state, step = build(method, runtime, folded, batch)
            if graphed:
                step = devices.GraphedStep(step, state.optimizer)
            rates.append(f"{'folded' if folded else 'chunked'} {'graph' if graphed else 'eager'} "
                         f"{steps_per_s(step, views, runtime.device):.1f}")
    report(method, "speed", True, "steps/s: " + ", ".join(rates))


def check_capture(method: str, runtime, batch: int, views, report) -> None:
    """Graph against eager, the lr inside a replay, the state each replay moves (CUDA only)."""
    def losses(graphed: bool) -> list:
        model, state, step = build(method, runtime, runtime.fold_bn, batch)
        step = devices.GraphedStep(step, state.optimizer) if graphed else step
        torch.manual_seed(1)
        return [step(*views).item() for _ in range(8)]
    eager, again, graph = losses(False), losses(False), losses(True)
    noise = max(abs(a - b) for a, b in zip(eager, again))
    gap = max(abs(a - b) for a, b in zip(eager, graph))
    report(method, "capture", gap <= max(10 * noise, 1e-3),
           f"max |graph - eager| {gap:.2e}, eager - eager {noise:.2e}")

    model, state, step = build(method, runtime, runtime.fold_bn, batch)
    graphed = devices.GraphedStep(step, state.optimizer)
    for _ in range(5):  # 3 eager, the capture, one replay
        graphed(*views)
    weights = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    s3l.set_lr(state.optimizer, 0.0)
    before = state_of(model)
    graphed(*views)
    still = all(torch.equal(a, b) for a, b in zip(weights, (
        p for p in model.parameters() if p.requires_grad)))
    moved_state = not torch.equal(before, state_of(model))
    s3l.set_lr(state.optimizer, 0.1)
    graphed(*views)
    moved = any(not torch.equal(a, b) for a, b in zip(weights, (
        p for p in model.parameters() if p.requires_grad)))
    report(method, "lr in replay", still and moved,
           f"lr 0: weights kept {still}; lr 0.1: weights moved {moved}")
    report(method, "state advances", moved_state, f"BN running mean and the method's state moved "
           f"in a replay: {moved_state}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="+", choices=sorted(s3l.METHODS),
                   default=sorted(s3l.METHODS))
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    runtime = devices.setup_device(args.device, "auto", True)
    failed = []

    def report(method, check, ok, detail):
        print(f"{method:<7}{check:<16}{'ok  ' if ok else 'FAIL'}  {detail}", flush=True)
        if not ok:
            failed.append(f"{method} {check}")
    t0 = time.time()
    for method in args.methods:
        check_method(method, runtime, args.batch_size, report)
    if runtime.device.type != "cuda":
        print("capture, lr in replay, state advances: need CUDA (not checked here)")
    print(f"{len(failed)} failed: {', '.join(failed)}" if failed else "all checks passed",
          f"in {time.time() - t0:.0f} s on {runtime.reason}; torch {torch.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
