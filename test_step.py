"""Specifications of the training step against torch's rules for a GPU (issue 31), checked on the
CPU: the views copy nothing from the host, the folded per-GPU BN keeps channels_last, a failed
CUDA-graph capture stops the run with its first cause, torchrun's wait for a decode does not
depend on NCCL's 10-minute default, the pinned store and SplitBatchNorm read nothing back; and the
step as the loops run it: evaluation without autograd, no read-backs, the folded BN against the
chunked one, --cuda-graphs against the eager step (a CPU stand-in for the graph, and a real one
where CUDA exists).

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
import checkpoints
import cli
import data
import devices
import models
import s3l
import train

from conftest import RecordedGraph, randn


def method_and_state(method, runtime, batch=8):
    args = cli.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             str(batch), "--moco-k", "16", "--bn-batch", "4",
                             "--byol-hidden-dim", "32"])
    torch.manual_seed(0)
    model = runtime.place(train.build_method(args, models.resnet18()))
    optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
    return model, checkpoints.TrainState(model, optimizer, runtime.scaler())


# ----- the step as the loops run it: evaluation, read-backs, folded BN, CUDA graphs ---------------

def test_evaluation_on_centre_views_builds_no_autograd_graph():
    """kNN features and test top-1 (devices.centre_view_outputs) run without autograd, so an
    evaluation over a whole split keeps no batch's activations alive, though the network's
    parameters require gradients."""
    runtime = devices.setup_device("cpu", "auto", True)
    net, store = models.resnet18(num_classes=3), data.synthetic_store(12, 20, 0)
    assert all(p.requires_grad for p in net.parameters())
    features = devices.extract_features(net, store, 16, runtime)
    logits = devices.centre_view_outputs(net, store, 16, runtime, batch_size=5)
    assert features.shape == (12, 512) and logits.shape == (12, 3)
    assert features.grad_fn is None and logits.grad_fn is None


@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_the_pretraining_step_reads_nothing_back_from_the_device(method, monkeypatch):
    """Two views and one step (train.pretrain_views, train.pretrain_step) of every method call no
    .item(), .cpu(), .tolist(), .numpy(), bool(), float() or int() on a tensor: on a GPU the host
    never waits between steps (the meter reads the loss back every --print-freq steps only). On
    CUDA, torch's sync debug mode checks the same at the kernel level."""
    args = cli.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             "8", "--moco-k", "16", "--bn-batch", "4", "--byol-hidden-dim", "32"])
    runtime = devices.setup_device("cuda" if torch.cuda.is_available() else "cpu", "auto", True)
    torch.manual_seed(0)
    model = runtime.place(train.build_method(args, models.resnet18()))
    optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
    state = checkpoints.TrainState(model, optimizer, runtime.scaler())
    store = data.synthetic_store(16, 20, 0).to(runtime.device, 1 << 30)
    augmenter, g = augment.SSLAugment(16), torch.Generator(runtime.device).manual_seed(0)
    idx = torch.arange(8, device=runtime.device)
    train.pretrain_step(model, state, runtime, *train.pretrain_views(store, idx, augmenter, g,
                                                                      runtime))  # warm-up
    calls = []
    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=original, **k: (
            calls.append(_n), _f(self, *a, **k))[1])
    if runtime.device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            views = train.pretrain_views(store, idx, augmenter, g, runtime)
            train.pretrain_step(model, state, runtime, *views)
    finally:
        if runtime.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert calls == [], calls


@pytest.mark.parametrize("where", ["cpu", "cuda"])
@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_folded_split_bn_trains_as_the_chunked_one(method, where):
    """Per-GPU BN in one kernel a layer (folded into channels, the CUDA path) gives the chunked
    form's loss, gradients and running statistics to float rounding: MoCo's shuffle-BN, SimCLR's
    grouped views, BYOL's per-view groups (on the CPU, and on a GPU where CUDA exists)."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    head = ["--head", "mlp-bn"] if method != "byol" else []  # BN in the head too
    args = cli.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             "16", "--moco-k", "32", "--bn-batch", "4", "--byol-hidden-dim", "32",
                             *head])
    torch.manual_seed(0)
    chunked = train.build_method(args, models.resnet18()).to(where)
    folded = s3l.fold_split_batchnorm_(copy.deepcopy(chunked), True)
    views = randn(16, 3, 32, 32, seed=1).to(where), randn(16, 3, 32, 32, seed=2).to(where)
    for model in (chunked, folded):
        torch.manual_seed(3)  # MoCo's key shuffle
        model.loss = model(*views)[0]
        model.loss.backward()
    assert torch.allclose(chunked.loss, folded.loss, rtol=1e-5, atol=1e-6)
    grads = [(n, a.grad, b.grad) for (n, a), b in zip(chunked.named_parameters(),
                                                      folded.parameters()) if a.grad is not None]
    scale = max(a.abs().max() for _, a, _ in grads)  # biases before a BN get rounding noise only
    for name, a, b in grads:
        assert (a - b).abs().max() <= 1e-3 * a.abs().max() + 1e-5 * scale, name
    for (name, a), b in zip(chunked.named_buffers(), folded.buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), name


def test_folded_split_bn_falls_back_to_chunks_on_an_uneven_batch():
    """Fine-tuning's last, smaller batch (14 images in 4 groups) cannot fold: it is split as
    evenly as possible, exactly as the chunked form does."""
    bn = s3l.SplitBatchNorm(3, 4)
    folded = s3l.fold_split_batchnorm_(copy.deepcopy(bn), True)
    x = randn(14, 3, 4, 4, seed=4)
    assert torch.equal(bn(x), folded(x)) and torch.equal(bn.running_var, folded.running_var)


@pytest.mark.parametrize("where", ["recorded", "cuda"])
@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_the_graphed_step_trains_as_the_eager_one(method, folded, where):
    """--cuda-graphs (devices.GraphedStep): six steps of every method, its BN chunked or folded (the
    CUDA path), with a new learning rate each step, two warm-up steps, a capture, replays: the
    same losses, health outputs, weights, buffers (MoCo's queue) and momentum as the eager step.
    On the CPU through RecordedGraph, where exactly; on a GPU through a real CUDA graph."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    runtime = devices.setup_device("cuda" if where == "cuda" else "cpu", "auto", True)
    args = cli.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             "8", "--moco-k", "16", "--bn-batch", "4", "--byol-hidden-dim", "32"])
    store = data.synthetic_store(16, 20, 0).to(runtime.device, 1 << 30)
    runs_of = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = train.build_method(args, models.resnet18())
        model = runtime.place(s3l.fold_split_batchnorm_(model, folded))
        optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
        state = checkpoints.TrainState(model, optimizer, runtime.scaler())
        step = train.pretrain_step
        if graphed:
            capture = RecordedGraph.capture if where == "recorded" else None
            step = devices.GraphedStep(step, optimizer, warmup=2, capture=capture)
        augmenter, g = augment.SSLAugment(16), torch.Generator(runtime.device).manual_seed(0)
        seen = []
        for i in range(6):
            s3l.set_lr(optimizer, 0.05 * (i + 1))
            idx = torch.arange(8, device=runtime.device) + 4 * (i % 3)
            views = train.pretrain_views(store, idx, augmenter, g, runtime)
            loss, outputs = step(model, state, runtime, *views)
            seen.append((loss.clone(), outputs["z1"].clone()))
        momentum = [optimizer.state[p]["momentum_buffer"] for p in model.parameters()
                    if p.requires_grad]
        runs_of.append((seen, model.state_dict(), momentum))
    (eager, eager_state, eager_momentum), (graph, graph_state, graph_momentum) = runs_of
    same = torch.equal if where == "recorded" else \
        (lambda a, b: torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4))
    for i, ((loss_e, z_e), (loss_g, z_g)) in enumerate(zip(eager, graph)):
        assert same(loss_e, loss_g) and same(z_e, z_g), (i, loss_e, loss_g)
    for key in eager_state:
        assert same(eager_state[key], graph_state[key]), key
    assert all(same(a, b) for a, b in zip(eager_momentum, graph_momentum))


def test_a_step_that_cannot_be_captured_stops_the_run_naming_the_operation():
    """A capture that fails (here a read-back, which no CUDA graph can hold) stops the run with
    that cause and --cuda-graphs named, once the eager warm-up steps have run as usual."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, fused=True)

    def step(x):  # float() reads the loss back to the host: not capturable
        loss = net(x).square().mean() * (1 + 0 * float(net.bias.detach()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    graphed = devices.GraphedStep(step, optimizer, warmup=1, capture=RecordedGraph.capture)
    x = randn(4, 8, 4, seed=5)
    graphed(x[0])
    with pytest.raises(SystemExit, match="could not be captured as a CUDA graph .*drop "
                                         "--cuda-graphs"):
        graphed(x[1])


def test_cuda_graphs_name_what_stands_in_their_way():
    """--cuda-graphs where no graph can be captured (here: the CPU, under --compile) stops before
    any work (cli.runtime_for) with every reason and the fix."""
    with pytest.raises(SystemExit, match="--cuda-graphs: it needs a CUDA device"):
        cli.runtime_for(cli.parse_args(["pretrain", "--cuda-graphs", "--device", "cpu"]))
    args = cli.parse_args(["pretrain", "--cuda-graphs", "--compile"])
    runtime = devices.setup_device("cpu", "auto", True)
    with pytest.raises(SystemExit) as stop:
        cli.check_cuda_graphs(args, runtime)
    assert "--cuda-graphs: it needs a CUDA device (this run is on cpu)" in str(stop.value)
    assert "--compile" in str(stop.value)
    cli.check_cuda_graphs(cli.parse_args(["pretrain"]), runtime)  # without the flag: nothing


# ----- the views and the step copy nothing from the host ------------------------------------------

@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_a_step_after_the_first_builds_no_tensor_from_host_data(method, monkeypatch):
    """torch.tensor(<list>, device=cuda) copies from pageable memory and waits for the GPU: every
    constant of the views (jitter identity, hue offsets, normalisation) is made once per device
    and dtype, so the second and third steps build no tensor from Python or numpy data."""
    runtime = devices.setup_device("cpu", "auto", True)
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


# ----- folded BN keeps channels_last --------------------------------------------------------------

@pytest.mark.parametrize("where", ["cpu", "cuda"])
@pytest.mark.parametrize("shape", [(16, 8, 6, 5), (16, 8, 1, 1)])
def test_folded_split_bn_keeps_channels_last_and_equals_the_chunked_form(shape, where):
    """The fold of 4 chunks into channels copies an NHWC input into an NHWC fold, so the output is
    channels_last-contiguous (the next convolution needs no conversion), with the chunked form's
    output, input gradient and running statistics (on a GPU too, where CUDA exists)."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    chunked = s3l.SplitBatchNorm(shape[1], 4)
    with torch.no_grad():
        chunked.weight.uniform_(0.5, 1.5)
        chunked.bias.uniform_(-0.5, 0.5)
    folded = s3l.fold_split_batchnorm_(copy.deepcopy(chunked), True)
    x = torch.randn(shape, dtype=torch.float64).to(where).contiguous(
        memory_format=torch.channels_last)
    chunked, folded = chunked.double().to(where), folded.double().to(where)
    outs = []
    for bn in (chunked, folded):
        xi = x.clone().requires_grad_()
        y = bn(xi)
        (y * torch.arange(y.numel(), dtype=y.dtype, device=where).view(y.shape)).sum().backward()
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
    graphed = devices.GraphedStep(step, opt, warmup=1, capture=failing_capture)
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
        wait = devices.decode_wait_group(datetime.timedelta(seconds=60))
        with devices.local_rank_0_first(wait):
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


# ----- the store in host memory: host indices, nothing read back ----------------------------------

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


# ----- the graphed-step test can fail -------------------------------------------------------------

def test_a_learning_rate_frozen_into_the_graph_at_capture_is_caught(monkeypatch):
    """test_the_graphed_step_trains_as_the_eager_one sets a new learning rate every step: with the
    lr left a Python float (read once, at capture, as a CUDA graph would), the replays train with
    the capture's lr and the graphed weights part from the eager ones, so that test fails."""
    real_init = devices.GraphedStep.__init__

    def float_lr(self, step, optimizer, *a, **k):
        real_init(self, step, optimizer, *a, **k)
        for group in optimizer.param_groups:
            group["lr"] = float(group["lr"])
    monkeypatch.setattr(devices.GraphedStep, "__init__", float_lr)
    with pytest.raises(AssertionError):
        test_the_graphed_step_trains_as_the_eager_one("moco", False, "recorded")
