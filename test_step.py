"""Specifications of the training step against torch's rules for a GPU (issue 31), checked on the
CPU: the views copy nothing from the host, the folded per-GPU BN keeps channels_last, a failed
CUDA-graph capture stops the run with its first cause, torchrun's wait for a decode does not
depend on NCCL's 10-minute default, the pinned store and SplitBatchNorm read nothing back.

Run: python -m pytest -q
"""
import copy
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import augment
import data
import models
import runs
import s3l
import train


def method_and_state(method, runtime, batch=8):
    args = train.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             str(batch), "--moco-k", "16", "--bn-batch", "4",
                             "--byol-hidden-dim", "32"])
    torch.manual_seed(0)
    model = runtime.place(train.build_method(args, models.resnet18()))
    optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
    return model, runs.TrainState(model, optimizer, runtime.scaler())


# ----- the views and the step copy nothing from the host ------------------------------------------

@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_a_step_after_the_first_builds_no_tensor_from_host_data(method, monkeypatch):
    """torch.tensor(<list>, device=cuda) copies from pageable memory and waits for the GPU: every
    constant of the views (jitter identity, hue offsets, normalisation) is made once per device
    and dtype, so the second and third steps build no tensor from Python or numpy data."""
    runtime = runs.setup_device("cpu", "auto", True)
    model, state = method_and_state(method, runtime)
    store = data.synthetic_store(16, 20, 0).to(runtime.device, 1 << 30)
    augmenter, g = augment.SSLAugment(16), torch.Generator(runtime.device).manual_seed(0)
    idx = torch.arange(8)
    train.pretrain_step(model, state, runtime, *train.pretrain_views(store, idx, augmenter, g,
                                                                      runtime))
    built = []
    for name in ("tensor", "as_tensor", "from_numpy"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _n=name, _f=real, **k: (
            built.append(_n), _f(*a, **k))[1])
    real_new = torch.Tensor.new_tensor
    monkeypatch.setattr(torch.Tensor, "new_tensor", lambda self, *a, **k: (
        built.append("new_tensor"), real_new(self, *a, **k))[1])
    for _ in range(2):
        views = train.pretrain_views(store, idx, augmenter, g, runtime)
        train.pretrain_step(model, state, runtime, *views)
    assert built == [], built


def test_split_batchnorm_without_momentum_keeps_a_cumulative_average_and_reads_nothing_back(
        monkeypatch):
    """momentum=None (BatchNorm's cumulative average) used .item() on the batch count every step:
    the running statistics are now chunk 0's cumulative average, updated on the device."""
    torch.manual_seed(0)
    split = s3l.SplitBatchNorm(3, 2, momentum=None)
    plain = torch.nn.BatchNorm2d(3, momentum=None)
    calls = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: calls.append("item"))
    for step in range(3):
        x = torch.randn(8, 3, 4, 4) * (step + 1)
        y = split(x)
        plain(x[:4])  # chunk 0
        assert torch.allclose(y[:4], torch.nn.functional.batch_norm(
            x[:4], None, None, split.weight, split.bias, True, 0.0, split.eps), atol=1e-6)
    assert calls == []
    assert torch.allclose(split.running_mean, plain.running_mean, atol=1e-6)
    assert torch.allclose(split.running_var, plain.running_var, atol=1e-6)


# ----- folded BN keeps channels_last ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(16, 8, 6, 5), (16, 8, 1, 1)])
def test_folded_split_bn_keeps_channels_last_and_equals_the_chunked_form(shape):
    """The fold of 4 chunks into channels copies an NHWC input into an NHWC fold, so the output is
    channels_last-contiguous (the next convolution needs no conversion), with the chunked form's
    output, input gradient and running statistics."""
    torch.manual_seed(0)
    chunked = s3l.SplitBatchNorm(shape[1], 4)
    with torch.no_grad():
        chunked.weight.uniform_(0.5, 1.5)
        chunked.bias.uniform_(-0.5, 0.5)
    folded = s3l.fold_split_batchnorm_(copy.deepcopy(chunked), True)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    chunked, folded = chunked.double(), folded.double()
    outs = []
    for bn in (chunked, folded):
        xi = x.clone().requires_grad_()
        y = bn(xi)
        (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape)).sum().backward()
        outs.append((y, xi.grad))
    (y_c, g_c), (y_f, g_f) = outs
    assert y_f.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y_c, y_f, atol=1e-12) and torch.allclose(g_c, g_f, atol=1e-9)
    assert torch.allclose(chunked.running_var, folded.running_var, atol=1e-12)


# ----- a failed capture stops the run with its first cause ----------------------------------------

def test_a_failed_capture_stops_the_run_with_its_first_cause_and_what_to_change(capsys):
    """torch.cuda.graph's exit ends the capture after an error in the captured step, which raises
    "capture invalidated" over the first cause and leaves the side stream current and the
    allocator's pool held: the run cannot go on eagerly. It stops, in one line, naming the first
    cause and --cuda-graphs, after running no eager step."""
    eager = []

    def step(x):
        eager.append(1)
        return x.sum()

    def failing_capture(fn):  # as torch.cuda.graph: its __exit__ raises over the step's error
        try:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        finally:
            raise RuntimeError("CUDA error: operation failed due to a previous error during "
                               "capture")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    graphed = runs.GraphedStep(step, opt, warmup=1, capture=failing_capture)
    graphed(torch.ones(2))  # warm-up, eager
    with pytest.raises(SystemExit) as e:
        graphed(torch.ones(2))
    message = str(e.value)
    assert "operation not permitted when stream is capturing" in message
    assert "previous error during capture" not in message and "\n" not in message.strip()
    assert "drop --cuda-graphs" in message and eager == [1]


# ----- torchrun: the wait for rank 0's decode -----------------------------------------------------

def decode_wait_worker(rank, port, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # the default group's timeout stands in for NCCL's 10 minutes: 2 s here
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    try:
        wait = runs.decode_wait_group(datetime.timedelta(seconds=60))
        with runs.local_rank_0_first(wait):
            if rank == 0:
                time.sleep(5)  # a decode longer than the default group's timeout
        with open(os.path.join(out, f"rank{rank}"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def test_the_other_ranks_wait_for_a_decode_longer_than_the_default_groups_timeout(tmp_path):
    """Under torchrun the other ranks wait while local rank 0 decodes a split; on NCCL's default
    group that wait ended the run after 10 minutes. The wait is a gloo barrier with its own
    timeout (--decode-timeout): a 5 s decode passes under a 2 s default-group timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(decode_wait_worker, args=(port, str(tmp_path)), nprocs=2,
                       start_method="fork" if "fork" in mp.get_all_start_methods() else "spawn")
    assert sorted(os.listdir(tmp_path)) == ["rank0", "rank1"]


# ----- the store in host memory: host indices, nothing read back ------------------------------------

def test_a_store_in_host_memory_draws_its_order_on_the_host_and_gathers_without_read_backs(
        monkeypatch):
    """A split too large for the GPU stays in (pinned) host memory: the loop's order is drawn on
    the host (index_device), so a batch's rows, sizes and labels are gathered with no .cpu(),
    .item() or .numpy() of a device index (on a GPU each was a wait for the previous step)."""
    store = data.synthetic_store(16, 20, 0)
    assert store.index_device == torch.device("cpu")
    idx = torch.tensor([3, 1, 4, 1])
    calls = []
    for name in ("item", "cpu", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=real, **k: (
            calls.append(_n), _f(self, *a, **k))[1])
    rows, sizes = store.batch(idx, torch.device("cpu"))
    labels = store.labels_of(idx)
    assert calls == []
    assert torch.equal(rows, store.images[idx]) and torch.equal(sizes, store.sizes[idx])
    assert torch.equal(labels, store.labels[idx])
