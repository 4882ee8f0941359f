"""Specifications of s3l, in the order of the modules: models -> s3l (losses, methods, recipe) ->
data -> train (command line, checkpoints, bad input). Tiny seeded CPU inputs; oracles are written
out naively here. The torch.distributed specifications spawn 2 CPU processes (gloo, 127.0.0.1).

Run: python -m pytest -q test_s3l.py
"""
import ast
import copy
import datetime
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import augment
import data
import health
import models
import runs
import s3l
import study
import train


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----- models.py ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, params", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                          ("resnet50", 25_557_032)])
def test_resnet_parameter_counts_equal_torchvision(arch, params):
    """With a 1000-way fc, every arch has torchvision's parameter count."""
    assert sum(p.numel() for p in models.ARCHS[arch](1000).parameters()) == params


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("conv5", [True, False])
@pytest.mark.parametrize("small_stem", [True, False])
def test_resnet_output_shapes_for_every_option(arch, conv5, small_stem):
    """Logits (N, classes) with fc; pooled (N, 256|512 x expansion) features without; any input
    size."""
    expansion = 4 if arch == "resnet50" else 1
    width = (512 if conv5 else 256) * expansion
    net = models.ARCHS[arch](0, conv5=conv5, small_stem=small_stem).eval()
    assert net.feature_dim == width
    assert net(randn(2, 3, 32, 32)).shape == (2, width)
    classifier = models.ARCHS[arch](7, conv5=conv5, small_stem=small_stem).eval()
    assert classifier(randn(2, 3, 24, 40)).shape == (2, 7)
    assert ("layer4.0.conv1.weight" in net.state_dict()) == conv5


def test_resnet_state_dict_uses_torchvision_names():
    """Keys a torchvision ResNet-50 has, with their shapes (spot checks of every kind of layer)."""
    sd = models.resnet50(1000).state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert sd["layer1.0.downsample.1.running_var"].shape == (256,)
    # v1.5: the stride sits on this conv
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["fc.weight"].shape == (1000, 2048)
    assert models.resnet18(small_stem=True).state_dict()["conv1.weight"].shape == (64, 3, 3, 3)


def test_macs_match_the_paper_table():
    """Analytic counts: R50 4.09 G at 224, 1.08 G at 112; R50 without conv5 3.28 G at 224."""
    assert models.macs(models.resnet50(), 224) / 1e9 == pytest.approx(4.09, abs=0.01)
    assert models.macs(models.resnet50(), 112) / 1e9 == pytest.approx(1.08, abs=0.01)
    assert models.macs(models.resnet50(conv5=False), 224) / 1e9 == pytest.approx(3.28, abs=0.01)


# ----- s3l.py: losses -----------------------------------------------------------------------------

def nt_xent_by_loops(z1, z2, t):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2, total = z.shape[0], 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        num = math.exp(float(z[i] @ z[pos]) / t)
        den = sum(math.exp(float(z[i] @ z[j]) / t) for j in range(n2) if j != i)
        total += -math.log(num / den)
    return total / n2


def test_nt_xent_equals_explicit_double_loop():
    """nt_xent == SimCLR Eq. 1 evaluated anchor by anchor (2N - 2 negatives each, mean over 2N)."""
    z1, z2 = randn(4, 8, seed=1), randn(4, 8, seed=2)
    assert float(s3l.nt_xent(z1, z2, 0.5)) == pytest.approx(nt_xent_by_loops(z1, z2, 0.5), rel=1e-5)


def test_nt_xent_falls_as_the_two_views_align():
    """Moving view 2 toward view 1 lowers the loss monotonically."""
    z1, noise = randn(8, 16, seed=3), randn(8, 16, seed=4)
    losses = [float(s3l.nt_xent(z1, z1 + a * noise, 0.2)) for a in (4.0, 1.0, 0.3, 0.0)]
    assert losses == sorted(losses, reverse=True) and losses[0] > losses[-1] + 1


def test_info_nce_equals_the_formula_row_by_row():
    """MoCo Eq. 1: -log exp(q.k+/t) / (exp(q.k+/t) + sum_queue exp(q.k-/t)), mean over queries."""
    q, k = randn(3, 8, seed=5), randn(3, 8, seed=6)
    queue = F.normalize(randn(8, 5, seed=7), dim=0)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(3):
        pos = math.exp(float(qn[i] @ kn[i]) / 0.2)
        neg = sum(math.exp(float(qn[i] @ queue[:, j]) / 0.2) for j in range(5))
        expected += -math.log(pos / (pos + neg)) / 3
    assert float(s3l.info_nce(q, k, queue, 0.2)) == pytest.approx(expected, rel=1e-5)


def test_byol_loss_is_zero_for_identical_directions_and_four_for_opposite():
    """2 - 2 cos: 0 when p and z point the same way (any lengths), 4 when opposite."""
    p = randn(5, 8)
    assert float(s3l.byol_loss(p, 3 * p)) == pytest.approx(0.0, abs=1e-6)
    assert float(s3l.byol_loss(p, -p)) == pytest.approx(4.0, abs=1e-6)


def test_nt_xent_of_every_rank_with_gathered_candidates_averages_to_the_whole_batch_loss():
    """Anchors local, candidates from all ranks: the mean over ranks of the rank losses is Eq. 1
    over the concatenated batch (each rank's positives sit at its own global rows)."""
    z1, z2 = randn(6, 8, seed=1), randn(6, 8, seed=2)  # 3 ranks of 2 images
    per_rank = [s3l.nt_xent_gathered(z1[2 * r:2 * r + 2], z2[2 * r:2 * r + 2], 0.5, z1, z2, rank=r)
                for r in range(3)]
    assert float(sum(per_rank) / 3) == pytest.approx(float(s3l.nt_xent(z1, z2, 0.5)), rel=1e-6)
    z1.requires_grad_(), z2.requires_grad_()
    one, gathered = s3l.nt_xent(z1, z2, 0.5), s3l.nt_xent_gathered(z1, z2, 0.5, z1, z2, rank=0)
    grads = [torch.autograd.grad(loss, (z1, z2)) for loss in (one, gathered)]
    assert torch.equal(one, gathered)  # one process: the same loss and gradients, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "byol_loss"])
def test_losses_are_fp32_under_bf16_autocast(loss):
    """Similarities and losses run in fp32 inside autocast: bf16 features from a bf16 layer give
    the fp32 loss of the same values to 1e-4 (bf16 z @ z.T and q @ queue were 4-6e-4 off here)."""
    queue = F.normalize(randn(32, 64, seed=3), dim=0)
    fn = dict(nt_xent=lambda a, b: s3l.nt_xent(a, b, 0.1), byol_loss=s3l.byol_loss,
              info_nce=lambda a, b: s3l.info_nce(a, b, queue, 0.2))[loss]
    layer, x = torch.nn.Linear(16, 32), randn(16, 16, seed=1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = layer(x), layer(x + 0.3 * randn(16, 16, seed=2))  # (16, 32) bf16 each
        mixed = fn(a, b)
    assert a.dtype == torch.bfloat16 and mixed.dtype == torch.float32
    assert float(mixed) == pytest.approx(float(fn(a.float(), b.float())), abs=1e-4)


def test_momentum_update_is_exactly_the_ema():
    """target <- m target + (1 - m) online, parameter by parameter."""
    online, target = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in target.parameters()]
    s3l.momentum_update_(target, online, 0.9)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o, atol=1e-7)


# ----- s3l.py: heads, split BN, methods -----------------------------------------------------------

def test_split_batchnorm_equals_batchnorm_per_chunk_and_keeps_chunk_0s_running_stats():
    """Chunk s (images s N/G to (s+1) N/G) is normalised with its own statistics, as GPU s would;
    the running statistics are chunk 0's (DDP broadcasts rank 0's); channels_last survives."""
    x = (randn(8, 3, 4, 4) * 2 + 1).contiguous(memory_format=torch.channels_last)
    split = s3l.SplitBatchNorm(3, num_splits=2).train()
    y = split(x)
    for s in range(2):
        ref = F.batch_norm(x[4 * s:4 * s + 4], None, None, training=True)
        assert torch.allclose(y[4 * s:4 * s + 4], ref, atol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(split.running_mean, 0.1 * x[:4].mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(split.running_var, 0.9 + 0.1 * x[:4].var(dim=(0, 2, 3)), atol=1e-5)
    eval_ref = F.batch_norm(x, split.running_mean, split.running_var)
    assert torch.allclose(split.eval()(x), eval_ref, atol=1e-6)


def test_split_batchnorm_splits_an_uneven_batch_as_evenly_as_possible():
    """Fine-tuning's last batch (13 images, 4 groups) is normalised in chunks of 4, 3, 3, 3, as
    torch.tensor_split (DataParallel's scatter of an uneven batch); 3 images make one group."""
    x, bn = randn(13, 3, 2, 2), s3l.SplitBatchNorm(3, 4).train()
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in x.tensor_split(4)])
    assert torch.allclose(bn(x), expected, atol=1e-5)
    assert torch.allclose(bn(x[:3]), F.batch_norm(x[:3], None, None, training=True), atol=1e-5)


def test_group_views_puts_both_views_of_a_chunk_in_one_bn_group_and_ungroup_inverts_it():
    """With G groups, BN chunk s of the (2N, ...) batch is [view1 chunk s, view2 chunk s]."""
    view1, view2 = torch.arange(8.0).view(8, 1), 100 + torch.arange(8.0).view(8, 1)
    x = s3l.group_views(view1, view2, groups=2)
    assert x.flatten().tolist() == [0, 1, 2, 3, 100, 101, 102, 103, 4, 5, 6, 7, 104, 105, 106, 107]
    z1, z2 = s3l.ungroup_views(x, groups=2)
    assert torch.equal(z1, view1) and torch.equal(z2, view2)


def tiny_moco(k=8, m=0.9):
    torch.manual_seed(0)
    return s3l.MoCo(models.resnet18(), dim=4, moco_k=k, moco_m=m, moco_t=0.2, bn_splits=2)


def test_moco_queue_is_fifo():
    """Keys enter the queue as normalised columns in arrival order, the oldest overwritten first."""
    moco = tiny_moco(k=8)
    batches = [randn(4, 4, seed=s) for s in range(3)]  # 3 batches of 4 into a queue of 8
    for k in batches:
        moco._dequeue_and_enqueue(k)
    assert int(moco.queue_ptr) == 4
    assert torch.allclose(moco.queue[:, 0:4].T, F.normalize(batches[2], dim=1), atol=1e-6)
    assert torch.allclose(moco.queue[:, 4:8].T, F.normalize(batches[1], dim=1), atol=1e-6)


def test_moco_forward_enqueues_one_batch_of_keys_after_the_loss():
    """A forward uses the queue as it was, then replaces exactly the next N columns."""
    moco = tiny_moco(k=8)
    before = moco.queue.clone()
    moco(randn(4, 3, 16, 16), randn(4, 3, 16, 16, seed=1))
    assert torch.equal(moco.queue[:, 4:], before[:, 4:]) and not torch.allclose(moco.queue[:, :4],
                                                                               before[:, :4])
    assert int(moco.queue_ptr) == 4


def test_moco_shuffle_bn_returns_every_key_in_its_querys_row():
    """Shuffle-BN permutes the keys across BN groups and back: with the batch statistics out of
    play (eval mode) the keys are exactly encoder_k(view2), row for row."""
    moco = tiny_moco()
    moco.encoder_k.eval()
    view2 = randn(8, 3, 16, 16, seed=1)
    assert torch.allclose(moco._keys(view2), moco.encoder_k(view2), atol=1e-6)


def test_moco_key_encoder_moves_by_exactly_the_ema_before_the_keys():
    """One forward: encoder_k <- m encoder_k + (1 - m) encoder_q (parameters), then keys are
    computed."""
    moco = tiny_moco(m=0.9)
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    q_params = [p.clone() for p in moco.encoder_q.parameters()]
    k_params = [p.clone() for p in moco.encoder_k.parameters()]
    moco(randn(4, 3, 16, 16), randn(4, 3, 16, 16, seed=1))
    for k_new, k_old, q in zip(moco.encoder_k.parameters(), k_params, q_params):
        assert torch.allclose(k_new, 0.9 * k_old + 0.1 * q, atol=1e-6)


def test_byol_batchnorm_sees_one_view_of_one_gpu_at_a_time():
    """The official builder runs each view through online, predictor and target separately on
    each GPU: BYOL's loss equals that, 2 "GPUs" x 2 views, each a plain BN batch of 4."""
    torch.manual_seed(0)
    byol = s3l.BYOL(models.resnet18(), dim=8, hidden_dim=16, bn_splits=2)
    view1, view2 = randn(8, 3, 16, 16, seed=1), randn(8, 3, 16, 16, seed=2)
    ref = copy.deepcopy(byol)
    for module in ref.modules():
        if isinstance(module, s3l.SplitBatchNorm):
            module.num_splits = 1  # plain BatchNorm: one call is one GPU's batch
    s3l.momentum_update_(ref.target, ref.online, ref.tau)

    def per_gpu(net, view):  # (8, 3, 16, 16) -> (8, 8); GPU s holds images 4s to 4s + 3
        return torch.cat([net(images) for images in view.chunk(2)])

    online = torch.nn.Sequential(ref.online, ref.predictor)
    with torch.no_grad():  # BN stays in training mode
        p1, p2 = per_gpu(online, view1), per_gpu(online, view2)
        z1, z2 = per_gpu(ref.target, view1), per_gpu(ref.target, view2)
        expected = s3l.byol_loss(p1, z2) + s3l.byol_loss(p2, z1)
        assert float(byol(view1, view2)) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_every_method_returns_a_finite_loss_that_trains_the_backbone(method):
    """forward(view1, view2) -> scalar; a backward step changes the backbone's conv1 (gradients
    flow)."""
    torch.manual_seed(0)
    kwargs = dict(moco=dict(moco_k=8), simclr={}, byol=dict(hidden_dim=32))[method]
    model = s3l.METHODS[method](models.resnet18(), dim=8, bn_splits=2, **kwargs)
    before = model.backbone.conv1.weight.clone()
    loss = model(randn(4, 3, 16, 16), randn(4, 3, 16, 16, seed=1))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_the_simclr_bn_head_is_linear_bn_relu_linear_bn_without_biases_in_bn_groups():
    """--head mlp-bn: exactly Linear(bias=False)-BN-ReLU-Linear(bias=False)-BN, the BN layers split
    into --bn-batch groups like every other BN; the default stays the official head (biases, no
    BN)."""
    args = train.parse_args(["pretrain", "--method", "simclr", "--head", "mlp-bn", "--arch",
                             "resnet18", "--batch-size", "64", "--bn-batch", "16"])
    fc = train.build_method(args, models.resnet18()).encoder.fc
    assert [type(m).__name__ for m in fc] == ["Linear", "SplitBatchNorm", "ReLU", "Linear",
                                              "SplitBatchNorm"]
    assert fc[0].bias is None and fc[3].bias is None and fc[0].in_features == 512
    assert fc[1].num_splits == fc[4].num_splits == 4 and fc[4].num_features == 128
    default = train.parse_args(["pretrain", "--method", "simclr", "--arch", "resnet18"])
    assert default.head == "mlp"
    fc = train.build_method(default, models.resnet18()).encoder.fc
    assert [type(m).__name__ for m in fc] == ["Linear", "ReLU", "Linear"]
    assert fc[0].bias is not None and fc[2].bias is not None
    moco = train.build_method(train.parse_args(["pretrain", "--head", "mlp-bn", "--arch",
                                                "resnet18"]), models.resnet18())
    assert type(moco.encoder_k.fc[4]).__name__ == "SplitBatchNorm"


def test_evaluation_on_centre_views_builds_no_autograd_graph():
    """kNN features and test top-1 (runs.centre_view_outputs) run without autograd, so an
    evaluation over a whole split keeps no batch's activations alive, though the network's
    parameters require gradients."""
    runtime = runs.setup_device("cpu", "auto", True)
    net, store = models.resnet18(num_classes=3), data.synthetic_store(12, 20, 0)
    assert all(p.requires_grad for p in net.parameters())
    features = runs.extract_features(net, store, 16, runtime)
    logits = runs.centre_view_outputs(net, store, 16, runtime, batch_size=5)
    assert features.shape == (12, 512) and logits.shape == (12, 3)
    assert features.grad_fn is None and logits.grad_fn is None


@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_the_pretraining_step_reads_nothing_back_from_the_device(method, monkeypatch):
    """Two views and one step (train.pretrain_views, train.pretrain_step) of every method call no
    .item(), .cpu(), .tolist(), .numpy(), bool(), float() or int() on a tensor: on a GPU the host
    never waits between steps (the meter reads the loss back every --print-freq steps only). On
    CUDA, torch's sync debug mode checks the same at the kernel level."""
    args = train.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             "8", "--moco-k", "16", "--bn-batch", "4", "--byol-hidden-dim", "32"])
    runtime = runs.setup_device("cuda" if torch.cuda.is_available() else "cpu", "auto", True)
    torch.manual_seed(0)
    model = runtime.place(train.build_method(args, models.resnet18()))
    optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
    state = runs.TrainState(model, optimizer, runtime.scaler())
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


@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_folded_split_bn_trains_as_the_chunked_one(method):
    """Per-GPU BN in one kernel a layer (folded into channels, the CUDA path) gives the chunked
    form's loss, gradients and running statistics to float rounding: MoCo's shuffle-BN, SimCLR's
    grouped views, BYOL's per-view groups (checked here on the CPU)."""
    head = ["--head", "mlp-bn"] if method != "byol" else []  # BN in the head too
    args = train.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             "16", "--moco-k", "32", "--bn-batch", "4", "--byol-hidden-dim", "32",
                             *head])
    torch.manual_seed(0)
    chunked = train.build_method(args, models.resnet18())
    folded = s3l.fold_split_batchnorm_(copy.deepcopy(chunked), True)
    views = randn(16, 3, 32, 32, seed=1), randn(16, 3, 32, 32, seed=2)
    for model in (chunked, folded):
        torch.manual_seed(3)  # MoCo's key shuffle
        model.loss = model(*views)
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


class RecordedGraph(TorchDispatchMode):
    """A CPU stand-in for a CUDA graph (runs.GraphedStep's `capture`), with its semantics: the
    capture records every aten operation of the step with the tensors it used and made, and leaves
    nothing changed (what existed before is restored, the RNG too); a replay runs the recorded
    operations again on the same tensors, writing each result where the capture's went. Python is
    not run again, so a value the step read on the host (a float learning rate) stays the
    capture's, exactly as in a CUDA graph; a read-back during capture fails, as on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops, self.before, self.made = [], {}, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError(f"{func}: a read-back to the host inside a CUDA graph capture")
        # some kernels write into inputs their schema does not mark (batch_norm's running stats)
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.made | self.before.keys():
                self.before[id(t)] = (t, t.detach().clone())
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        self.made.update(id(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    @torch.no_grad()
    def replay(self):
        for func, args, kwargs, out in self.ops:
            for old, new in zip(tree_flatten(out)[0], tree_flatten(func(*args, **kwargs))[0]):
                if isinstance(old, torch.Tensor) and old is not new:
                    old.copy_(new)

    @staticmethod
    def capture(fn):
        graph, rng = RecordedGraph(), torch.get_rng_state()
        try:
            with graph:
                out = fn()
        finally:  # a failed capture changed nothing either
            with torch.no_grad():
                for t, value in graph.before.values():
                    t.copy_(value)
            torch.set_rng_state(rng)
        return out, graph.replay


@pytest.mark.parametrize("where", ["recorded", "cuda"])
@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_the_graphed_step_trains_as_the_eager_one(method, folded, where):
    """--cuda-graphs (runs.GraphedStep): six steps of every method, its BN chunked or folded (the
    CUDA path), with a new learning rate each step, two warm-up steps, a capture, replays: the
    same losses, health outputs, weights, buffers (MoCo's queue) and momentum as the eager step.
    On the CPU through RecordedGraph, where exactly; on a GPU through a real CUDA graph."""
    if where == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    runtime = runs.setup_device("cuda" if where == "cuda" else "cpu", "auto", True)
    args = train.parse_args(["pretrain", "--method", method, "--arch", "resnet18", "--batch-size",
                             "8", "--moco-k", "16", "--bn-batch", "4", "--byol-hidden-dim", "32"])
    store = data.synthetic_store(16, 20, 0).to(runtime.device, 1 << 30)
    runs_of = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = train.build_method(args, models.resnet18())
        model = runtime.place(s3l.fold_split_batchnorm_(model, folded))
        optimizer = runtime.sgd([p for p in model.parameters() if p.requires_grad], 0.1, 0.9, 1e-4)
        state = runs.TrainState(model, optimizer, runtime.scaler())
        step = lambda *views: train.pretrain_step(model, state, runtime, *views)  # noqa: E731
        if graphed:
            capture = RecordedGraph.capture if where == "recorded" else None
            step = runs.GraphedStep(step, optimizer, warmup=2, capture=capture)
        augmenter, g = augment.SSLAugment(16), torch.Generator(runtime.device).manual_seed(0)
        seen = []
        for i in range(6):
            s3l.set_lr(optimizer, 0.05 * (i + 1))
            idx = torch.arange(8, device=runtime.device) + 4 * (i % 3)
            loss = step(*train.pretrain_views(store, idx, augmenter, g, runtime))
            seen.append((loss.clone(), model.outputs["z1"].clone()))
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
    graphed = runs.GraphedStep(step, optimizer, warmup=1, capture=RecordedGraph.capture)
    x = randn(4, 8, 4, seed=5)
    graphed(x[0])
    with pytest.raises(SystemExit, match="could not be captured as a CUDA graph .*drop "
                                         "--cuda-graphs"):
        graphed(x[1])


def test_cuda_graphs_name_what_stands_in_their_way():
    """--cuda-graphs where no graph can be captured (here: the CPU, under --compile) stops before
    any work (runs.runtime_for) with every reason and the fix; without the flag the step is the
    eager one."""
    with pytest.raises(SystemExit, match="--cuda-graphs: it needs a CUDA device"):
        runs.runtime_for(train.parse_args(["pretrain", "--cuda-graphs", "--device", "cpu"]))
    args = train.parse_args(["pretrain", "--cuda-graphs", "--compile"])
    runtime = runs.setup_device("cpu", "auto", True)
    with pytest.raises(SystemExit) as stop:
        runs.graphed_step(args, runtime, train.pretrain_step, None)
    assert "--cuda-graphs: it needs a CUDA device (this run is on cpu)" in str(stop.value)
    assert "--compile" in str(stop.value)
    step = train.pretrain_step
    assert runs.graphed_step(train.parse_args(["pretrain"]), runtime, step, None) is step


def test_byol_refuses_the_head_flag(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["pretrain", "--method", "byol", "--head", "mlp-bn"])
    assert "--head is for moco and simclr" in capsys.readouterr().err


# ----- s3l.py: several processes (torch.distributed) ----------------------------------------------

def test_without_a_process_group_the_distributed_pieces_are_no_ops():
    """No process group: rank 0 of 1, gathers return their input, SimCLR's two negative modes
    agree (the single-process behaviour is unchanged)."""
    assert not dist.is_initialized() and s3l.rank_and_world_size() == (0, 1)
    x = randn(4, 8)
    assert s3l.concat_all_gather(x) is x and s3l.gather_with_grad(x) is x
    view1, view2 = randn(4, 3, 16, 16, seed=1), randn(4, 3, 16, 16, seed=2)
    losses = []
    for gather_negatives in (True, False):
        torch.manual_seed(0)
        model = s3l.SimCLR(models.resnet18(), dim=8, gather_negatives=gather_negatives)
        losses.append(model(view1, view2).detach())
    assert torch.equal(losses[0], losses[1])


def one_step(method, view1, view2, bn_splits, ddp=False):
    """One seeded forward + backward: the loss, two gradients and (MoCo) the queue after it."""
    torch.manual_seed(0)
    kwargs = dict(moco=dict(moco_k=16), simclr={})[method]
    model = s3l.METHODS[method](models.resnet18(), dim=8, bn_splits=bn_splits, **kwargs)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    torch.manual_seed(1 + dist.get_rank() if ddp else 1)  # rank 1's own shuffle must not count
    loss = net(view1, view2)
    loss.backward()  # with DDP: gradients averaged over the ranks
    head = model.backbone.fc[2].weight  # the last layer; conv1 is the first
    out = dict(loss=loss.detach(), conv1=model.backbone.conv1.weight.grad, fc=head.grad)
    return dict(out, queue=model.queue.clone()) if method == "moco" else out


def two_rank_worker(rank, port, out_dir):
    """Rank `rank` of 2 (gloo, CPU): gather_with_grad alone, then one DDP step of SimCLR and of
    MoCo on its half of an 8-image batch, one BN group per rank; results saved for the tests."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a failed collective raises after a minute instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    x = torch.full((2, 3), rank + 1.0, requires_grad=True)
    gathered = s3l.gather_with_grad(x)  # (4, 3)
    (gathered * (rank + 1) * torch.arange(4.0).view(4, 1)).sum().backward()
    results = dict(gathered=gathered.detach(), x_grad=x.grad)
    mine = slice(4 * rank, 4 * rank + 4)
    for method in ("simclr", "moco"):
        view1, view2 = randn(8, 3, 16, 16, seed=1)[mine], randn(8, 3, 16, 16, seed=2)[mine]
        results[method] = one_step(method, view1, view2, bn_splits=1, ddp=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results of two_rank_worker, run once in 2 spawned processes (which import this
    file: it must keep running nothing at import)."""
    out_dir = tmp_path_factory.mktemp("two_ranks")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # a free port
    torch.multiprocessing.spawn(two_rank_worker, args=(port, str(out_dir)), nprocs=2)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(2)]


def test_gather_with_grad_sums_each_ranks_gradient_of_my_rows(two_ranks):
    """Rank order forward; backward: rank r's rows get the sum over ranks of d loss_r' / d rows."""
    for rank, results in enumerate(two_ranks):
        assert results["gathered"].tolist() == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
        expected = (1 + 2) * torch.arange(4.0)[2 * rank:2 * rank + 2].view(2, 1).expand(2, 3)
        assert torch.equal(results["x_grad"], expected)


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_two_ranks_equal_one_process_with_two_bn_groups(two_ranks, method):
    """2 ranks x 4 images == 1 process x 8 images in 2 BN groups: the mean of the ranks' losses is
    the loss, DDP's averaged gradients are the gradients (SimCLR: gathered negatives), and MoCo's
    queues on both ranks hold every rank's keys in the single-process order (global shuffle-BN)."""
    ref = one_step(method, randn(8, 3, 16, 16, seed=1), randn(8, 3, 16, 16, seed=2), bn_splits=2)
    ranks = [results[method] for results in two_ranks]
    assert float(sum(r["loss"] for r in ranks) / 2) == pytest.approx(float(ref["loss"]), rel=1e-5)
    for name in [name for name in ref if name != "loss"]:
        for r in ranks:  # fp32 sums in another order: compare relative to the whole tensor
            assert float((r[name] - ref[name]).norm() / ref[name].norm()) < 1e-4, name


# ----- augment.py: the batched augmentation -------------------------------------------------------

def test_the_augmentation_file_imports_torch_and_the_standard_library_only():
    """'Copy the augmentation' is 'copy augment.py': it imports nothing of this project, nor numpy
    or PIL."""
    tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "augment.py")).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert imported <= {"torch", "math", "dataclasses", "functools"} and "torch" in imported, \
        imported


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_random_resized_crop_boxes_stay_inside_each_image_and_reach_its_corners():
    """torchvision's RandomResizedCrop.get_params per image, over each image's own (h, w): in a
    batch mixing portrait, landscape (4:3) and square images every box lies inside its own image
    with area >= scale[0] of it, and over 3000 draws the boxes cover every pixel, corners included
    (the old centre-square store never reached a 4:3 photo's corners)."""
    sizes = torch.tensor([[48, 64], [64, 48], [40, 40]]).repeat(1000, 1)
    boxes = augment.random_resized_crop_boxes(sizes, (0.2, 1.0), (3 / 4, 4 / 3), gen())
    top, left, h, w = boxes.long().unbind(1)
    height, width = sizes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    assert ((h * w) / (height * width) >= 0.2 - 0.05).all()
    for k in range(3):  # coverage map of each image's boxes
        seen = torch.zeros(*sizes[k].tolist())
        for t, l, bh, bw in boxes[k::3].long().tolist():
            seen[t:t + bh, l:l + bw] += 1
        assert seen.min() > 0 and seen[0, 0] > 0 and seen[-1, -1] > 0, sizes[k].tolist()
    assert len(set(map(tuple, boxes.tolist()))) > 1000  # per-image parameters, not one per batch


def test_crop_with_scale_one_and_ratio_one_is_the_identity_resize():
    """RRC(scale (1, 1), ratio (1, 1)) of a square image = the whole image resized: itself at the
    same size, torch's antialiased bilinear interpolate at others."""
    x, sizes = torch.rand(3, 3, 20, 20, generator=gen()), torch.full((3, 2), 20)
    boxes = augment.random_resized_crop_boxes(sizes, (1.0, 1.0), (1.0, 1.0), gen())
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 20.0, 20.0]] * 3))
    assert torch.allclose(augment.crop_resize(x, sizes, boxes, 20), x, atol=1e-5)
    for out in (7, 12, 31):
        resized = F.interpolate(x, size=(out, out), mode="bilinear", antialias=True)
        assert torch.allclose(augment.crop_resize(x, sizes, boxes, out), resized, atol=1e-5)
    flip = torch.ones(3, dtype=torch.bool)
    assert torch.allclose(augment.crop_resize(x, sizes, boxes, 20, flip), x.flip(-1), atol=1e-5)


def pil_resize(img, size, box=None, flip=False):
    """The oracle: PIL's resize of a float (C, H, W) image, channel by channel in mode "F"."""
    chans = [Image.fromarray(c.numpy(), "F").resize(size, Image.BILINEAR, box=box) for c in img]
    out = torch.from_numpy(np.stack([np.asarray(c) for c in chans]))
    return out.flip(-1) if flip else out


def psnr(a, b):
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


def fine_detail_batch():
    """A 60 x 80 (h x w) image of uniform noise, and its transpose, on one 80 x 80 canvas."""
    img = torch.rand(3, 60, 80, generator=gen(9))
    x = torch.zeros(2, 3, 80, 80)
    x[0, :, :60, :], x[1, :, :, :60] = img, img.transpose(1, 2)
    return x, torch.tensor([[60, 80], [80, 60]]), [img, img.transpose(1, 2)]


def test_crop_resize_equals_pil_resize_of_the_same_box():
    """crop_resize == PIL's img.resize((out, out), BILINEAR, box) (antialiased; torchvision's
    RandomResizedCrop on the photo) on the same boxes and flips, box/out from < 1 to > 3, landscape
    and portrait images of noise: PSNR > 100 dB (measured >= 122 dB: float rounding only)."""
    x, sizes, images = fine_detail_batch()
    sizes16, flip = sizes.repeat(8, 1), torch.arange(16) % 4 < 2  # both flips on both images
    box_per_out = []
    for out in (12, 24, 40, 70):
        boxes = augment.random_resized_crop_boxes(sizes16, (0.05, 1.0), (3 / 4, 4 / 3), gen(out))
        views = augment.crop_resize(x.repeat(8, 1, 1, 1), sizes16, boxes, out, flip)
        for view, (top, left, h, w), f, k in zip(views, boxes.tolist(), flip, range(16)):
            ref = pil_resize(images[k % 2], (out, out), (left, top, left + w, top + h), bool(f))
            assert psnr(view, ref) > 100, (out, top, left, h, w)
        box_per_out.append(boxes[:, 2:] / out)
    assert torch.cat(box_per_out).min() < 0.5 and torch.cat(box_per_out).max() > 3


def test_uint8_input_and_bf16_resampling_stay_within_two_levels_of_float32():
    """crop_resize on the uint8 store applies ToTensor's /255 itself; in bf16 (the CPU/GPU fast
    path Runtime picks) every view pixel stays within 2/255 of the float32 result."""
    x = torch.randint(0, 256, (16, 3, 80, 80), dtype=torch.uint8, generator=gen(3))
    sizes = torch.tensor([[60, 80], [80, 60]]).repeat(8, 1)
    boxes = augment.random_resized_crop_boxes(sizes, (0.05, 1.0), (3 / 4, 4 / 3), gen(4))
    exact = augment.crop_resize(x.float() / 255, sizes, boxes, 24)
    assert torch.allclose(augment.crop_resize(x, sizes, boxes, 24), exact, atol=1e-5)
    fast = augment.crop_resize(x, sizes, boxes, 24, dtype=torch.bfloat16)
    assert fast.dtype == torch.float32 and (fast - exact).abs().max() < 2 / 255


def test_finetune_and_center_views_equal_pil_resize_then_crop():
    """center_view == Resize(round(s x 8/7)) -> CenterCrop(s) and finetune_train_view ==
    Resize -> RandomCrop(s) anywhere in the non-square image -> flip, both through PIL (torchvision
    0.7, the official fine-tuning transforms), on the same offsets: PSNR > 100 dB (measured >= 125).
    """
    x, sizes, images = fine_detail_batch()
    mean, std = torch.tensor(augment.IMAGENET_MEAN), torch.tensor(augment.IMAGENET_STD)
    for s in (24, 40, 56):
        resize = round(s * 8 / 7)
        g = gen(s)
        train_views = augment.finetune_train_view(x, augment.finetune_train_params(sizes, s, g), s)
        g = gen(s)  # the same draws: crop_boxes, then the flips
        boxes, flip = augment.crop_boxes(sizes, s, g), torch.rand(2, generator=g) < 0.5
        center = augment.center_view(x, sizes, s)
        for k, img in enumerate(images):
            h, w = img.shape[1:]
            rh, rw = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
            resized = pil_resize(img, (rw, rh))
            top, left = round((rh - s) / 2), round((rw - s) / 2)
            ref = resized[:, top:top + s, left:left + s]
            assert psnr(center[k] * std.view(3, 1, 1) + mean.view(3, 1, 1), ref) > 100, (s, k)
            top, left = [round(v) for v in (boxes[k, :2] * torch.tensor([rh / h, rw / w])).tolist()]
            ref = resized[:, top:top + s, left:left + s].flip(-1) if flip[k] else \
                resized[:, top:top + s, left:left + s]
            assert psnr(train_views[k] * std.view(3, 1, 1) + mean.view(3, 1, 1), ref) > 100


def test_every_augmentation_keeps_shape_and_range():
    """Each op maps (N, 3, H, W) in [0, 1] to the same shape in [0, 1], whatever its parameters."""
    x = torch.rand(64, 3, 16, 16, generator=gen())
    params = augment.SSLAugment(16, solarize_p=0.5).sample(torch.full((64, 2), 16), gen(1))
    ops = {"jitter": lambda t: augment.color_jitter(t, *params["jitter"]),
           "grayscale": lambda t: augment.grayscale(t, params["gray"]),
           "blur": lambda t: augment.gaussian_blur(t, params["sigma"], radius=6),
           "solarize": lambda t: augment.solarize(t, params["solarize"]),
           "crop": lambda t: augment.crop_resize(t, params["sizes"], params["boxes"], 12,
                                              params["flip"])}
    for name, op in ops.items():
        y = op(x)
        assert y.shape[:2] == x.shape[:2] and y.min() >= 0 and y.max() <= 1 + 1e-6, name


def test_augmentation_parameters_differ_across_the_batch():
    """Every image draws its own crop, flip, jitter factors and order, grey, blur and solarisation;
    the probabilities of the paper's pipeline show in the frequencies (MoCo v2 aug-plus)."""
    n = 4000
    p = augment.SSLAugment(16, solarize_p=0.3).sample(torch.full((n, 2), 20), gen(2))
    factors, order = p["jitter"]
    applied = factors[:, 0] != 1
    assert len({tuple(b) for b in p["boxes"].tolist()}) > 100
    assert abs(applied.float().mean() - 0.8) < 0.03 and factors[applied].std(0).min() > 0.05
    assert len({tuple(o) for o in order.tolist()}) == 24  # all 4! op orders occur
    for key, prob in [("flip", 0.5), ("gray", 0.2), ("solarize", 0.3)]:
        assert abs(p[key].float().mean() - prob) < 0.03, key
    blurred = p["sigma"] > 0
    assert abs(blurred.float().mean() - 0.5) < 0.03
    assert p["sigma"][blurred].min() >= 0.1 and p["sigma"].max() <= 2.0


def test_jitter_applies_its_ops_in_each_images_own_order():
    """color_jitter equals applying brightness, contrast, saturation and hue one image at a time
    in that image's order (the naive oracle)."""
    x = torch.rand(200, 3, 5, 5, generator=gen(3))
    factors, order = augment.color_jitter_params(200, 0.4, 0.4, 0.4, 0.1, 1.0, gen(4))
    assert len({tuple(o) for o in order.tolist()}) == 24  # every order is checked
    ops = [lambda t, f: (t * f).clamp(0, 1),
           lambda t, f: (f * t + (1 - f) * augment._gray(t).mean()).clamp(0, 1),
           lambda t, f: (f * t + (1 - f) * augment._gray(t)).clamp(0, 1),
           lambda t, f: augment._shift_hue(t, torch.tensor(f).view(1, 1, 1, 1))]
    y = augment.color_jitter(x, factors, order)
    for i in range(200):
        ref = x[i:i + 1]
        for k in order[i].tolist():
            ref = ops[k](ref, float(factors[i, k]))
        assert torch.allclose(y[i:i + 1], ref, atol=1e-5), i


def test_ssl_augment_produces_normalised_views_of_the_requested_size():
    """Full pipeline: uint8 store (N, 3, L, L) with sizes (N, 2) -> (N, 3, input_size,
    input_size), two views differ."""
    imgs = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8, generator=gen())
    sizes = torch.tensor([[20, 20], [15, 20], [20, 14], [9, 12]]).repeat(2, 1)
    aug = augment.SSLAugment(16)
    g = gen(5)
    v1, v2 = aug(imgs, sizes, g), aug(imgs, sizes, g)  # uint8 in, as train.py feeds it
    assert v1.shape == (8, 3, 16, 16) and not torch.allclose(v1, v2)
    lo = (0 - max(augment.IMAGENET_MEAN)) / min(augment.IMAGENET_STD)
    hi = (1 - min(augment.IMAGENET_MEAN)) / min(augment.IMAGENET_STD)
    assert v1.min() >= lo - 1e-5 and v1.max() <= hi + 1e-5


def test_hue_shift_matches_colorsys():
    """The batched RGB->HSV->RGB hue shift equals Python's colorsys pixel by pixel."""
    import colorsys
    x = torch.rand(2, 3, 3, 3, generator=gen())
    y = augment._shift_hue(x, torch.tensor([0.1, -0.07]).view(2, 1, 1, 1))
    for n, shift in enumerate((0.1, -0.07)):
        for i in range(3):
            for j in range(3):
                h, s, v = colorsys.rgb_to_hsv(*x[n, :, i, j].tolist())
                ref = colorsys.hsv_to_rgb((h + shift) % 1, s, v)
                assert torch.allclose(y[n, :, i, j], torch.tensor(ref), atol=1e-5)


def test_blur_with_sigma_zero_is_exact_identity_and_blur_matches_a_dense_gaussian():
    """sigma 0: untouched; sigma s: each pixel = sum of exp(-d^2 / 2s^2)-weighted neighbours, edge
    pixels repeated (PIL), computed here with an explicit 2-D kernel."""
    x = torch.rand(2, 3, 9, 9, generator=gen())
    assert torch.equal(augment.gaussian_blur(x, torch.zeros(2), radius=3), x)
    y = augment.gaussian_blur(x, torch.tensor([0.0, 1.3]), radius=3)
    t = torch.arange(-3, 4.0)
    k2 = torch.exp(-(t.view(-1, 1) ** 2 + t.view(1, -1) ** 2) / (2 * 1.3 ** 2))
    padded = F.pad(x[1:], (3, 3, 3, 3), mode="replicate")
    ref = F.conv2d(padded.transpose(0, 1), (k2 / k2.sum()).view(1, 1, 7, 7)).transpose(0, 1)
    assert torch.allclose(y[1:], ref, atol=1e-5) and torch.equal(y[:1], x[:1])


# ----- data.py: readers, decoding, cache, bad input -----------------------------------------------

def write_image(path, size=(24, 20), mode="RGB", seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def make_folder(root, classes=2, per_class=8, size=(24, 20), split="train"):
    for c in range(classes):
        for i in range(per_class):
            path = os.path.join(root, split, f"class{c}", f"img{i}.png")
            write_image(path, size, seed=c * 100 + i)
    return str(root)


def test_image_folder_classes_are_sorted_and_labels_follow(tmp_path):
    for cls in ("b", "a", "c"):
        write_image(str(tmp_path / "train" / cls / "x.jpg"))
    listing = data.list_split(str(tmp_path), "train")
    assert listing.classes == ["a", "b", "c"] and listing.labels == [0, 1, 2]


def test_flat_folder_is_unlabeled_and_root_itself_is_the_train_split(tmp_path):
    for i in range(3):
        write_image(str(tmp_path / f"{i}.png"))
    listing = data.list_split(str(tmp_path), "train")
    assert listing.labels is None and len(listing.paths) == 3


def test_cub_official_layout_splits_by_is_training_image(tmp_path):
    """images.txt + train_test_split.txt (1 = train) + image_class_labels.txt (1-based)."""
    rows = [(1, "001.A/a1.jpg", 1, 1), (2, "001.A/a2.jpg", 0, 1), (3, "002.B/b1.jpg", 1, 2)]
    for i, rel, _, _ in rows:
        write_image(str(tmp_path / "images" / rel), seed=i)
    (tmp_path / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _, _ in rows))
    (tmp_path / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, _ in rows))
    (tmp_path / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, _, c in rows))
    (tmp_path / "classes.txt").write_text("1 001.A\n2 002.B\n")
    train_split = data.list_split(str(tmp_path), "train")
    test_split = data.list_split(str(tmp_path), "test")
    assert [os.path.basename(p) for p in train_split.paths] == ["a1.jpg", "b1.jpg"]
    assert train_split.labels == [0, 1] and test_split.labels == [0]
    assert train_split.classes == ["001.A", "002.B"]
    assert data.default_eval_split(str(tmp_path)) == "test"


def test_missing_and_empty_folders_raise_errors_that_name_them(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        data.list_split(str(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        data.list_split(str(tmp_path / "empty"), "train")
    (tmp_path / "labelled" / "train" / "cat").mkdir(parents=True)
    write_image(str(tmp_path / "labelled" / "train" / "dog" / "x.png"))
    with pytest.raises(ValueError, match="cat has no images"):
        data.list_split(str(tmp_path / "labelled"), "train")


def test_decoding_handles_every_image_mode(tmp_path):
    """CMYK, 16-bit grey, palette, alpha and tiny images all decode to RGB uint8 (3, h, w)
    correctly; images smaller than the store keep their own size."""
    red = Image.new("RGB", (10, 8), (255, 0, 0))
    red.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(np.full((8, 10), 65535 // 2, dtype=np.uint16)).save(tmp_path / "grey16.png")
    red.convert("P").save(tmp_path / "palette.png")
    Image.new("RGBA", (10, 8), (0, 0, 255, 0)).save(tmp_path / "alpha.png")
    Image.new("RGB", (3, 2), (0, 255, 0)).save(tmp_path / "tiny.png")
    out = {name: data.decode_image(str(tmp_path / name), 16) for name in
           ("cmyk.jpg", "grey16.png", "palette.png", "alpha.png", "tiny.png")}
    assert all(v.dtype == np.uint8 for v in out.values())
    assert all(v.shape == (3, 8, 10) for k, v in out.items() if k != "tiny.png")
    assert out["cmyk.jpg"][0].mean() > 240 and out["cmyk.jpg"][1:].mean() < 15
    assert abs(int(out["grey16.png"].mean()) - 127) <= 1  # scaled from 16 bits, not clipped to 255
    assert out["palette.png"][0].min() > 240
    assert out["alpha.png"].min() == 255  # fully transparent: the white background, not hidden blue
    assert out["tiny.png"].shape == (3, 2, 3) and (out["tiny.png"][1] == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: the white half goes to the top
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = data.decode_image(str(tmp_path / "rot.jpg"), 10)  # displayed 10 x 20, centre 13 rows
    assert out.shape == (3, 13, 10)
    assert out[:, :6].mean() > 200 and out[:, 8:].mean() < 50  # white on top, not on the left


def test_decode_keeps_the_aspect_ratio_up_to_the_cap_and_never_upscales(tmp_path):
    """decode_image: shorter side -> short_side (PIL's antialiased resize), longer side
    centre-cropped to at most round(short x max_aspect); max_aspect 1 is the centre square; a photo
    smaller than short_side keeps its own pixels."""
    paths = {(w, h): write_image(str(tmp_path / f"{w}x{h}.png"), (w, h)) for w, h in
             [(80, 60), (60, 80), (100, 40), (24, 20)]}
    assert data.decode_image(paths[80, 60], 30).shape == (3, 30, 40)  # 4:3 whole
    assert data.decode_image(paths[60, 80], 30).shape == (3, 40, 30)  # portrait whole
    assert data.decode_image(paths[100, 40], 20).shape == (3, 20, 27)  # 5:2 cut to 4:3
    assert data.decode_image(paths[60, 80], 30, max_aspect=1).shape == (3, 30, 30)
    source = np.asarray(Image.open(paths[80, 60])).transpose(2, 0, 1)
    centre = data.decode_image(paths[80, 60], 60, max_aspect=1.25)  # 60 x 75 of 60 x 80
    assert np.array_equal(centre, source[:, :, 2:77])
    small = data.decode_image(paths[24, 20], 64)  # capped at the source's short side
    assert np.array_equal(small, np.asarray(Image.open(paths[24, 20])).transpose(2, 0, 1))


def test_cache_key_covers_short_side_and_max_aspect(tmp_path, capsys):
    """A changed short side or max_aspect decodes anew (never a stale cache); the same ones reuse
    it, sizes included."""
    root = make_folder(tmp_path, classes=1, per_class=2, size=(40, 20))
    listing, cache = data.list_split(root, "train"), str(tmp_path / "cache")
    for short_side, max_aspect, sizes, cached in [(16, 1.5, [16, 24], False),
                                                  (16, 2.0, [16, 32], False),
                                                  (12, 1.5, [12, 18], False),
                                                  (16, 1.5, [16, 24], True)]:
        images, got, _ = data.load_split(listing, short_side, cache, max_aspect=max_aspect)
        assert got.tolist() == [sizes] * 2 and images.shape == (2, 3, sizes[1], sizes[1])
        assert ("from cache" in capsys.readouterr().out) == cached, (short_side, max_aspect)
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 3


def test_unreadable_files_are_skipped_with_a_count_and_non_images_ignored(tmp_path, capsys):
    root = make_folder(tmp_path, classes=1, per_class=3)
    good = os.path.join(root, "train", "class0")
    with open(os.path.join(good, "img0.png"), "rb") as f:
        blob = f.read()
    with open(os.path.join(good, "truncated.png"), "wb") as f:
        f.write(blob[: len(blob) // 2])
    with open(os.path.join(good, "text.jpg"), "w") as f:
        f.write("not an image")
    with open(os.path.join(good, "notes.txt"), "w") as f:
        f.write("ignored by extension")
    listing = data.list_split(root, "train")
    assert len(listing.paths) == 5  # .txt is not listed
    images, sizes, kept = data.load_split(listing, 16, str(tmp_path / "cache"))
    assert len(kept) == 3 and images.shape == (3, 3, 19, 19)  # 24 x 20 photos -> 19 x 16
    assert sizes.tolist() == [[16, 19]] * 3
    assert "skipped 2 unreadable of 5" in capsys.readouterr().out


def test_disk_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, capsys):
    root = make_folder(tmp_path, classes=1, per_class=3)
    cache = str(tmp_path / "cache")
    first, sizes, _ = data.load_split(data.list_split(root, "train"), 16, cache)
    assert "decoded 3 images" in capsys.readouterr().out
    again, sizes_again, _ = data.load_split(data.list_split(root, "train"), 16, cache)
    assert "from cache" in capsys.readouterr().out and np.array_equal(first, again)
    assert np.array_equal(sizes, sizes_again) and sizes.dtype == np.int64
    path = data.list_split(root, "train").paths[0]
    Image.new("RGB", (24, 20), (7, 7, 7)).save(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    changed, _, _ = data.load_split(data.list_split(root, "train"), 16, cache)
    assert "decoded 3 images" in capsys.readouterr().out
    assert (changed[0, :, :16, :19] == 7).all() and not np.array_equal(changed, first)


def test_store_gathers_batches_from_memory_and_from_the_memmap_alike(tmp_path, capsys):
    root = make_folder(tmp_path, classes=2, per_class=4)
    listing = data.list_split(root, "train")
    images, sizes, _ = data.load_split(listing, 16, str(tmp_path / "cache"))
    cpu = torch.device("cpu")
    on_disk = data.ImageStore(images, sizes, listing.labels).to(cpu, max_bytes=0)
    in_memory = data.ImageStore(images, sizes, listing.labels).to(cpu, max_bytes=1 << 30)
    assert isinstance(on_disk.images, np.ndarray) and isinstance(in_memory.images, torch.Tensor)
    assert "stays memory-mapped on disk" in capsys.readouterr().out
    idx = torch.tensor([5, 0, 3])
    (a, sizes_a), (b, sizes_b) = on_disk.batch(idx, cpu), in_memory.batch(idx, cpu)
    assert torch.equal(a, b) and torch.equal(sizes_a, sizes_b)
    assert torch.equal(sizes_a, torch.as_tensor(sizes)[idx]) and a.shape == (3, 3, 19, 19)
    part = in_memory.subset([3, 5])
    assert torch.equal(part.batch(torch.tensor([1]), cpu)[0], a[:1])
    assert part.labels.tolist() == [0, 1]


def test_builtin_dataset_is_deterministic_and_balanced():
    a, la = data.synthetic_dataset(40, 16, seed=3)
    b, lb = data.synthetic_dataset(40, 16, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.dtype == torch.uint8
    assert torch.bincount(la).tolist() == [4] * len(data.SHAPES)
    store = data.synthetic_store(40, 16, seed=3)
    assert torch.equal(store.images, a) and (store.sizes == 16).all()


# ----- train.py: the command line, checkpoints, bad input -----------------------------------------

def pretrain_argv(root, save_dir, *extra):
    return ["pretrain", "--data", root, "--arch", "resnet18", "--input-size", "16", "--epochs", "2",
            "--batch-size", "8", "--moco-k", "16", "--bn-batch", "4", "--save-dir", str(save_dir),
            "--cache-dir", os.path.join(os.path.dirname(str(save_dir)), "cache"),
            "--print-freq", "1",
            *extra]


def test_pretrain_cli_smoke_writes_a_self_describing_run_folder(tmp_path):
    """Two epochs of MoCo on generated images: checkpoint, config.json, log.jsonl, summary.json,
    kNN."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    make_folder(tmp_path / "data", classes=2, per_class=4, split="val")
    train.main(pretrain_argv(root, tmp_path / "run", "--knn-every", "1"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    config = json.load(open(tmp_path / "run" / "config.json"))
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert 0 <= summary["knn_top1"] <= 100 and summary["macs_per_image"] > 0
    assert config["moco_t"] == 0.2 and config["lr"] == 0.03  # the method's paper defaults filled in
    assert os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_resumed_run_reaches_the_same_weights_as_an_uninterrupted_one(tmp_path):
    """Resuming from the epoch-1 checkpoint reproduces the 2-epoch run exactly (model, queue,
    optimizer)."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    train.main(pretrain_argv(root, tmp_path / "full", "--save-every", "1"))
    train.main(pretrain_argv(root, tmp_path / "resumed", "--resume",
                             str(tmp_path / "full" / "checkpoint_0001.pt")))
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["model"]
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["model"]
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_a_graphed_run_logs_saves_and_resumes_as_an_eager_one(tmp_path, monkeypatch):
    """The pretraining loop through a graphed step (RecordedGraph standing in for CUDA): the same
    losses in log.jsonl and the same weights as the eager run; its epoch-1 checkpoint (its learning
    rate saved as a tensor) resumes an eager run to the same weights."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    train.main(pretrain_argv(root, tmp_path / "eager"))
    monkeypatch.setattr(runs, "graphed_step", lambda args, runtime, step, optimizer: (
        runs.GraphedStep(step, optimizer, warmup=2, capture=RecordedGraph.capture)))
    train.main(pretrain_argv(root, tmp_path / "graphed", "--save-every", "1"))
    monkeypatch.undo()
    train.main(pretrain_argv(root, tmp_path / "resumed", "--resume",
                             str(tmp_path / "graphed" / "checkpoint_0001.pt")))
    logs = [[r["loss"] for r in map(json.loads, open(tmp_path / run / "log.jsonl"))]
            for run in ("eager", "graphed", "resumed")]
    assert logs[0] == logs[1] and logs[2] == logs[0][1:] and len(logs[0]) == 2  # resumed: epoch 2
    weights = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"]
               for run in ("eager", "graphed", "resumed")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
        assert torch.equal(weights[0][key], weights[2][key]), key


def test_blur_p_sets_how_often_pretraining_views_are_blurred(tmp_path, monkeypatch):
    """--blur-p 0 (CIFAR recipes at 32 px) draws no blur for any view of the run; the default blurs
    about half of them (MoCo v2's aug-plus)."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    sigmas, sample = [], augment.SSLAugment.sample
    monkeypatch.setattr(augment.SSLAugment, "sample", lambda self, *a: (
        lambda p: (sigmas.append(p["sigma"]), p)[1])(sample(self, *a)))
    train.main(pretrain_argv(root, tmp_path / "sharp", "--epochs", "1", "--blur-p", "0"))
    assert len(sigmas) == 4 and all((s == 0).all() for s in sigmas)
    sigmas.clear()
    train.main(pretrain_argv(root, tmp_path / "blurred", "--epochs", "1"))
    assert 0 < torch.cat(sigmas).gt(0).sum() < 32


def test_bf16_autocast_path_trains_on_cpu(tmp_path):
    """The GPU's bf16 autocast path runs on CPU as well. At 32 px, not the other tests' 16: torch
    2.13's CPU bf16 convolution now and then gives a NaN weight gradient for a 3x3 stride-2 conv on
    a 1x1 input (layer4's first conv at 16 px; it failed 4 of 16 runs): a bug of torch, not ours."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1", "--amp", "bf16",
                             "--input-size", "32"))
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert math.isfinite(summary["final_loss"]) and summary["device"].startswith("bf16")


def test_fp16_gradient_scaler_path_runs_on_cpu_when_forced(tmp_path, monkeypatch):
    """The CUDA fp16 path (autocast + GradScaler) is exercised on CPU by forcing the runtime, while
    the --amp fp16 flag itself is refused on a CPU with a message naming it."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    with pytest.raises(SystemExit, match="--amp fp16 needs a CUDA GPU"):
        train.main(pretrain_argv(root, tmp_path / "refused", "--amp", "fp16"))
    forced = runs.Runtime(torch.device("cpu"), torch.float16, True, "fp16: forced on CPU")
    monkeypatch.setattr(runs, "runtime_for", lambda args: forced)
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1"))
    assert json.load(open(tmp_path / "run" / "summary.json"))["device"] == forced.reason


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "64"], "larger than the training split"),
    (["--moco-k", "20"], "not divisible by --batch-size"),
    (["--bn-batch", "3"], "not a multiple of --bn-batch"),
])
def test_bad_pretrain_arguments_fail_before_any_work(tmp_path, extra, message):
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    with pytest.raises(SystemExit, match=message):
        train.main(pretrain_argv(root, tmp_path / "run", *extra))
    assert not os.path.exists(tmp_path / "run" / "log.jsonl")


@pytest.mark.parametrize("method, batch, warmup", [
    ("simclr", 512, 10), ("simclr", 256, 0), ("byol", 512, 10), ("byol", 128, 0),
    ("moco", 512, 0)])
def test_simclr_and_byol_warm_up_10_epochs_only_above_a_batch_of_256(method, batch, warmup):
    """The official warm-up rule: 10 linear epochs when the batch exceeds 256 (SimCLR and BYOL);
    MoCo v2 never warms up; an explicit --warmup-epochs always wins."""
    args = train.parse_args(["pretrain", "--method", method, "--batch-size", str(batch)])
    assert args.warmup_epochs == warmup
    args = train.parse_args(["pretrain", "--method", method, "--warmup-epochs", "3"])
    assert args.warmup_epochs == 3


def test_byol_keeps_its_predictor_unless_asked_for_the_ablation_that_collapses():
    """--no-byol-predictor (BYOL's Table 5b ablation, README's collapsed run) builds no predictor
    and is shape-defining for --resume; the default builds BYOL's Linear-BN-ReLU-Linear."""
    args = train.parse_args(["pretrain", "--method", "byol", "--byol-hidden-dim", "16"])
    assert args.byol_predictor is True
    predictor = train.build_method(args, models.resnet18()).predictor
    assert [type(m).__name__ for m in predictor] == ["Linear", "SplitBatchNorm", "ReLU", "Linear"]
    args = train.parse_args(["pretrain", "--method", "byol", "--no-byol-predictor"])
    assert isinstance(train.build_method(args, models.resnet18()).predictor, torch.nn.Identity)
    assert "byol_predictor" in runs.SHAPE_DEFINING


def test_every_value_of_the_defaults_blocks_has_a_comment():
    """METHOD_DEFAULTS and STAGE_DEFAULTS: each line holding a value says why or in what unit."""
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")).read()
    for name in ("METHOD_DEFAULTS = {", "STAGE_DEFAULTS = {"):
        block = src.split(name)[1].split("\n}")[0].strip("\n").splitlines()
        assert block and all("#" in line for line in block if "=" in line), (name, block)


def test_unknown_arch_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        train.main(["pretrain", "--arch", "resnet9"])
    assert "invalid choice: 'resnet9'" in capsys.readouterr().err


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        train.main(pretrain_argv(str(tmp_path / "nowhere"), tmp_path / "run"))


# ----- health.py: label-free measures of a run, the collapse warning, health.png ------------------

def test_effective_rank_is_the_dimension_for_gaussian_data_r_for_rank_r_and_1_for_a_constant():
    """RankMe: about D for an (N >> D) Gaussian batch, about r for a rank-r one, 1 for equal rows,
    NaN (not an exception) for non-finite features."""
    g = torch.Generator().manual_seed(0)
    assert 0.95 * 32 < float(health.effective_rank(torch.randn(1024, 32, generator=g))) <= 32
    for r in (1, 5, 10):
        low_rank = torch.randn(1024, r, generator=g) @ torch.randn(r, 32, generator=g)
        assert 0.9 * r < float(health.effective_rank(low_rank)) <= r + 1e-3, r
    assert float(health.effective_rank(torch.ones(64, 32))) == pytest.approx(1.0, abs=1e-3)
    assert math.isnan(float(health.effective_rank(torch.full((4, 4), float("nan")))))


def test_alignment_uniformity_spread_and_cosines_equal_their_formulas_on_a_hand_made_batch():
    """z1 = (e1, e2), z2 = (e1, e1): alignment (0 + 2) / 2 = 1; uniformity of z1 log exp(-2 x 2) =
    -4, of z2 log exp(0) = 0; spread of z1 std(1, 0) x sqrt(2) = 1, of equal rows 0; the positive
    cosines (1, 0), the negative (e1.e1, e2.e1) = (1, 0)."""
    z1 = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # not unit length: the measures normalise
    z2 = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    assert float(health.alignment(z1, z2)) == pytest.approx(1.0)
    assert float(health.uniformity(z1)) == pytest.approx(-4.0)
    assert float(health.uniformity(z2)) == pytest.approx(0.0, abs=1e-6)
    assert float(health.spread(z1)) == pytest.approx(1.0)
    assert float(health.spread(z2)) == pytest.approx(0.0, abs=1e-6)
    m = health.measure(dict(features=z1, z1=z1, z2=z2))
    assert float(m["cos_pos"]) == pytest.approx(0.5) and float(m["cos_neg"]) == pytest.approx(0.5)
    assert float(m["uniform"]) == pytest.approx(-2.0) and float(m["rank"]) == pytest.approx(2.0)


def test_chance_loss_is_log_k_plus_1_for_moco_and_the_scaled_log_2n_minus_1_for_simclr():
    assert health.chance_loss("moco", 256, 4096) == pytest.approx(math.log(4097))
    assert health.chance_loss("simclr", 128, None, 0.1 / 0.07) == pytest.approx(
        math.log(255) / 0.7)
    assert health.chance_loss("byol", 128, None) is None


def gaussian_outputs(g, n=16, d=8):
    """A method's `outputs` for a healthy batch: features, z1, z2 from N(0, 1), (n, d) each."""
    return {k: torch.randn(n, d, generator=g) for k in ("features", "z1", "z2")}


def feed_monitor(monitor, outputs, loss, epochs=1):
    """The loop's calls to a HealthMonitor for `epochs` epochs of its steps; returns the records."""
    records = []
    for epoch in range(epochs):
        for step in range(monitor.steps):
            if monitor.due(step):
                monitor.observe(epoch, step, outputs(), torch.tensor(loss))
        records.append(monitor.epoch_record(epoch, loss))
    return records


def test_a_collapsed_representation_is_warned_about_once_and_a_spread_one_is_not(capsys):
    """Equal outputs for every image: one warning in the first epoch, naming the spread and the
    causes; Gaussian outputs: none. The records hold the epoch's means."""
    g = torch.Generator().manual_seed(0)
    monitor = health.HealthMonitor("simclr", 5.0, print_freq=2, steps=4, causes="--lr 9")
    constant = dict(features=torch.ones(16, 32), z1=torch.ones(16, 8), z2=torch.ones(16, 8))
    records = feed_monitor(monitor, lambda: constant, 4.0, epochs=2)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "collapsed at epoch 1 step 2" in out, out
    assert "spread 0.000" in out and "--lr 9" in out and "The run goes on" in out
    assert records[0]["spread_z"] == 0 and records[0]["rank_z"] == pytest.approx(1, abs=1e-3)
    monitor = health.HealthMonitor("simclr", 5.0, print_freq=2, steps=4, causes="--lr 9")
    records = feed_monitor(monitor, lambda: gaussian_outputs(g), 4.0, epochs=2)
    assert "warning" not in capsys.readouterr().out
    assert records[1]["spread_z"] > 0.8 and records[1]["rank_max"] == 8
    assert records[1]["chance"] == 5.0


def test_a_loss_at_chance_for_a_whole_epoch_after_the_first_is_warned_about(capsys):
    """MoCo at log(K + 1) all of epoch 2: warned, once; epoch 1, which starts at chance, is not."""
    g = torch.Generator().manual_seed(0)
    chance = health.chance_loss("moco", 8, 64)
    monitor = health.HealthMonitor("moco", chance, print_freq=1, steps=2, causes="--lr 1")
    feed_monitor(monitor, lambda: gaussian_outputs(g), chance, epochs=3)
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "sat at chance (4.174) for all of epoch 2" in out, out


def test_a_constant_encoder_is_warned_about_within_one_epoch_of_a_real_run(tmp_path, monkeypatch,
                                                                          capsys):
    """train.py pretrain with a backbone whose features are the same for every image: the warning
    comes in epoch 1, the run goes on and ends, log.jsonl holds the measures, health.png exists."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    monkeypatch.setattr(models.ResNet, "forward_features",
                        lambda self, x: torch.ones(x.shape[0], self.feature_dim) + 0 * x.mean())
    train.main(pretrain_argv(root, tmp_path / "run", "--method", "simclr", "--knn-every", "0"))
    out = capsys.readouterr().out
    assert "warning: the representation collapsed at epoch 1" in out, out
    records = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2] and records[0]["spread_z"] == 0
    assert Image.open(tmp_path / "run" / "health.png").size == (1200, 800)


def test_a_healthy_tiny_run_records_the_measures_and_no_health_records_none(tmp_path, capsys):
    """BYOL, SimCLR and MoCo on generated images: every measure in every record, strict JSON, the
    progress line shows the rank, no warning; --no-health: no measure and no health.png."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    keys = {"rank", "rank_z", "spread_z", "align", "uniform", "cos_pos", "cos_neg", "rank_max",
            "rank_share", "rank_z_share"}
    for method in ("byol", "simclr", "moco"):
        train.main(pretrain_argv(root, tmp_path / method, "--method", method, "--knn-every", "0",
                                 "--epochs", "1"))
        out = capsys.readouterr().out
        assert "rank " in out and "/8 spread " in out and "warning" not in out, out
        text = (tmp_path / method / "log.jsonl").read_text()
        record = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
        assert keys <= set(record) and ("chance" in record) == (method != "byol"), record
        assert (tmp_path / method / "health.png").exists()
    train.main(pretrain_argv(root, tmp_path / "off", "--no-health", "--epochs", "1"))
    record = json.loads((tmp_path / "off" / "log.jsonl").read_text())
    assert not keys & set(record) and not (tmp_path / "off" / "health.png").exists()
    assert "rank " not in capsys.readouterr().out


# ----- faults: a failed run fails, an interrupted run keeps its work, no flag crashes it ---------

def run_child(argv, cwd, script="train.py", **kwargs):
    """train.py (or study.py) in a child process (for real signals), with this project on its
    path."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    return subprocess.Popen([sys.executable, script, *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def same_weights(path_a, path_b):
    a, b = (torch.load(p, weights_only=True)["model"] for p in (path_a, path_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size: must be >= 2, got 0"),
    (["--batch-size", "-8"], "--batch-size: must be >= 2"),
    (["--save-every", "0"], "--save-every: must be >= 1"),
    (["--print-freq", "0"], "--print-freq: must be >= 1"),
    (["--input-size", "0"], "--input-size: must be >= 8"),
    (["--input-size", "-32"], "--input-size: must be >= 8"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--crop-scale", "1.0", "0.2"], "--crop-scale 1.0 0.2: the smaller area fraction comes first"),
    (["--moco-t", "0"], "--moco-t: must be > 0"),
    (["--moco-m", "1.5"], "--moco-m: must be [0, 1]"),
    (["--lr", "nan"], "--lr: must be >= 0"),
    (["--workers", "x"], "--workers: expected an integer"),
    (["--subset", "total=-3"], "--subset: expected per-class=N, total=N, classes=C,total=N"),
    (["--subset", "per-class=0"], "--subset: expected per-class=N"),
    (["--subset", "per-class=abc"], "--subset: expected per-class=N"),
    (["--subset", "classes=5,total=2"], "--subset: expected"),
    (["--subset", "fraction=1.5"], "fraction=F (0 < F <= 1)"),
    (["--device", "banana"], "--device: expected auto, cpu, cuda or cuda:N, got 'banana'"),
])
def test_every_numeric_flag_is_checked_at_parse_time(argv, message, capsys):
    """Bad numbers, --subset forms and --device names stop at the parser, with the flag and what
    it accepts in the message: nothing trains on a silently different subset."""
    with pytest.raises(SystemExit):
        train.parse_args(["pretrain", *argv])
    assert message in capsys.readouterr().err


def test_workers_are_capped_at_the_cores_with_a_note(capsys):
    args = train.parse_args(["pretrain", "--workers", "200"])
    assert args.workers == (os.cpu_count() or 1) and "more than the" in capsys.readouterr().out


def test_a_new_run_never_mixes_with_another_runs_results(tmp_path, capsys):
    """A second run into a folder with a checkpoint is refused and changes nothing; --start-over
    moves the old run's files into previous-<time>/ and starts anew."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    argv = pretrain_argv(root, tmp_path / "run", "--epochs", "1")
    train.main(argv)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(SystemExit, match="holds another run's results .*--start-over"):
        train.main(argv + ["--lr", "0.1"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    train.main(argv + ["--lr", "0.1", "--start-over"])
    aside = next((tmp_path / "run").glob("previous-*"))
    assert {p.name: p.read_bytes() for p in aside.iterdir()} == before
    assert json.load(open(tmp_path / "run" / "config.json"))["lr"] == 0.1


def test_pretraining_goes_on_without_the_monitor_when_the_test_classes_differ(tmp_path, capsys):
    """val/ with other classes than train/: pretraining needs no labels, so it trains with the kNN
    monitor off and a line naming the classes."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    os.makedirs(tmp_path / "data" / "val" / "other")
    write_image(str(tmp_path / "data" / "val" / "other" / "a.png"), (24, 20), seed=1)
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1", "--knn-every", "0"))
    out = capsys.readouterr().out
    assert "kNN monitor off" in out and "'other'" in out and "pretraining itself" in out


def test_unusable_paths_are_refused_before_any_decoding(tmp_path):
    """--data that is a file, a --save-dir under a file: one line naming the flag."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="--data .* is a file, not a folder"):
        train.main(pretrain_argv(str(tmp_path / "file"), tmp_path / "run"))
    with pytest.raises(SystemExit, match="--save-dir .*: cannot create the folder"):
        train.main(pretrain_argv(root, tmp_path / "file" / "run", "--cache-dir",
                                 str(tmp_path / "cache")))
    assert not list((tmp_path / "cache").glob("*.npy"))  # nothing was decoded


@pytest.mark.parametrize("poison", ["lr", "batch"])
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, poison,
                                                                            monkeypatch):
    """A NaN loss (lr 1e6, or NaN views from epoch 2 on) exits non-zero naming the step and the
    likely cause; checkpoint.pt keeps the epoch before and no summary claims a result."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    if poison == "batch":  # 2 steps of 2 views an epoch: the fifth view on is NaN
        crop_resize, calls = augment.crop_resize, []
        monkeypatch.setattr(augment, "crop_resize", lambda *a, **k: crop_resize(*a, **k) * (
            float("nan") if calls.append(1) or len(calls) > 4 else 1.0))
    lr = ["--lr", "1e6"] if poison == "lr" else []
    with pytest.raises(SystemExit, match="not finite at epoch .* step .*lower --lr") as stop:
        train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "5", *lr))
    stopped_in = int(str(stop.value).split("not finite at epoch ")[1].split()[0])
    assert stop.value.code != 0 and not (tmp_path / "run" / "summary.json").exists()
    assert stopped_in > 1 and (poison == "lr" or stopped_in == 2)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == stopped_in - 1


def test_records_stay_valid_json_with_null_for_nan(tmp_path):
    """json_safe: NaN and infinities become null, nested too."""
    assert runs.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == \
        {"a": None, "b": [1.0, None], "c": "x"}


def test_an_epoch_with_non_finite_steps_logs_their_count_and_no_mean_that_hides_them():
    """Steps 1, NaN, 3: the record's loss is NaN (null in log.jsonl), nonfinite_steps 1, and the
    finite steps' mean 2 is given beside it under its own name."""
    meter = runs.EpochMeter(0, 1, 3, 4, 12, print_freq=10, device=torch.device("cpu"))
    for step, loss in enumerate([1.0, float("nan"), 3.0]):
        meter.add(step, torch.tensor(loss), lr=0.1)
    record = meter.record()
    assert math.isnan(record["loss"]) and record["nonfinite_steps"] == 1
    assert record["loss_of_finite_steps"] == 2.0


def test_the_non_finite_diagnosis_names_this_runs_settings(tmp_path):
    """--weight-decay 1e30 in an fp32 run: the error names it with its value and the precision,
    not fp16 advice that does not apply."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    with pytest.raises(SystemExit, match=r"--weight-decay \(now 1e\+30\); --batch-size 8; fp32")\
            as stop:
        train.main(pretrain_argv(root, tmp_path / "run", "--weight-decay", "1e30", "--epochs", "3"))
    assert "fp16" not in str(stop.value)


def test_a_second_run_into_a_busy_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path,
                                                                                  capsys):
    """One run per --save-dir: a live owner's lock refuses the second run; a dead one's is taken."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    (tmp_path / "run").mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run" / ".lock").write_text(f"{sleeper.pid} {socket.gethostname()}")
        with pytest.raises(SystemExit, match=f"in use by process {sleeper.pid}"):
            train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1"))
    finally:
        sleeper.kill()
        sleeper.wait()
    (tmp_path / "run" / "checkpoint.pt.999.tmp").write_text("half a checkpoint")
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1"))
    assert "is gone, taking the folder over" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint.pt", "config.json", "health.png",
                                                    "log.jsonl", "summary.json"]


def test_interrupt_restores_the_previous_signal_handlers_even_when_the_loop_raises():
    """runs.Interrupt is a context: inside it SIGINT and SIGTERM only set `requested`; leaving it,
    by an exception too (a non-finite loss, an interrupted run's exit), restores the handlers."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(SystemExit):
        with runs.Interrupt() as interrupt:
            assert signal.getsignal(signal.SIGINT) == interrupt.handle
            os.kill(os.getpid(), signal.SIGTERM)
            assert interrupt.requested
            raise SystemExit(130)
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_saves_the_interrupted_epoch_and_resume_is_exact(tmp_path, signum, status):
    """Ctrl-C (or SIGTERM) mid-epoch: the step ends, checkpoint.pt holds it, exit status 130 (143,
    as the shell reports a terminated process); --resume from it reaches the same weights as an
    uninterrupted run, and log.jsonl has each epoch once."""
    root = make_folder(tmp_path / "data", classes=2, per_class=16)
    extra = ["--epochs", "2", "--batch-size", "4", "--moco-k", "8"]
    argv = pretrain_argv(root, tmp_path / "run", *extra)
    child = run_child(argv, cwd=tmp_path)
    for line in iter(lambda: child.stdout.readline(), ""):  # wait until it trains
        if "step 2/" in line:
            break
    child.send_signal(signum)
    out = child.communicate(timeout=120)[0]
    assert child.returncode == status and "--resume" in out, out
    assert "step" in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    train.main(argv + ["--resume", str(tmp_path / "run" / "checkpoint.pt")])
    train.main(pretrain_argv(root, tmp_path / "full", *extra))
    assert same_weights(tmp_path / "run" / "checkpoint.pt", tmp_path / "full" / "checkpoint.pt")
    epochs = [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "log.jsonl")]
    assert epochs == [1, 2]


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_is_exact(tmp_path):
    """A process killed while writing epoch 2's checkpoint leaves epoch 1's intact (atomic rename);
    resuming from it reaches the uninterrupted run's weights; the stale lock and temp file go."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    argv = pretrain_argv(root, tmp_path / "run", "--epochs", "3")
    killer = ("import os, signal, sys, torch, runs, train\n"
              "save, calls = torch.save, []\n"
              "def dying_save(obj, f):\n"
              "    calls.append(f)\n"
              "    if len(calls) == 2:\n"
              "        open(f, 'wb').write(b'PK half')\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(obj, f)\n"
              "runs.torch.save = dying_save\n"
              f"train.main({argv!r})\n")
    child = subprocess.run([sys.executable, "-c", killer], cwd=os.path.dirname(
        os.path.abspath(__file__)), capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    train.main(argv + ["--resume", str(tmp_path / "run" / "checkpoint.pt")])
    train.main(pretrain_argv(root, tmp_path / "full", "--epochs", "3"))
    assert same_weights(tmp_path / "run" / "checkpoint.pt", tmp_path / "full" / "checkpoint.pt")
    assert not [f for f in os.listdir(tmp_path / "run") if f.endswith(".tmp") or f == ".lock"]


def test_resume_refuses_other_settings_other_commands_and_corrupt_files(tmp_path, capsys):
    """--resume: changed settings are listed (and allowed with --force-resume); a checkpoint of
    another method or command gets one line naming the command; flipped bytes fail the checksum."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    make_folder(tmp_path / "data", classes=2, per_class=2, split="val")
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1"))
    ckpt = str(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(SystemExit, match=r"differs from the checkpoint.s in .*input_size 16 -> 24"):
        train.main(pretrain_argv(root, tmp_path / "run", "--input-size", "24", "--resume", ckpt))
    with pytest.raises(SystemExit, match=r"checkpoint of `train.py pretrain --method moco`"):
        train.main(pretrain_argv(root, tmp_path / "b", "--method", "byol", "--resume", ckpt))
    with pytest.raises(SystemExit, match=r"checkpoint of `train.py pretrain --method moco`"):
        train.main(stage_argv("finetune", root, tmp_path, "ft", "--resume", ckpt))
    with pytest.raises(SystemExit, match=r"another model .*arch 'resnet18' -> 'resnet34'.*not "
                                         "even with --force-resume"):
        train.main(pretrain_argv(root, tmp_path / "run", "--arch", "resnet34", "--resume", ckpt,
                                 "--force-resume"))
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "2", "--resume", ckpt,
                             "--force-resume"))
    assert "--force-resume: continuing although epochs 1 -> 2" in capsys.readouterr().out
    raw = bytearray(open(ckpt, "rb").read())
    i = raw.index(b"data/") + 200  # inside the first tensor's bytes
    raw[i] ^= 0xFF
    open(ckpt, "wb").write(bytes(raw))
    with pytest.raises(SystemExit, match="corrupt"):
        train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "2", "--resume", ckpt))


def test_a_symlink_loop_lists_each_image_once_and_outside_links_still_work(tmp_path):
    """`bees/loop -> .` must not repeat the class (it listed every image 41 times); a symlink to a
    folder outside the tree is followed."""
    root = make_folder(tmp_path / "data", classes=2, per_class=3)
    os.symlink(".", os.path.join(root, "train", "class0", "loop"))
    outside = make_folder(tmp_path / "elsewhere", classes=1, per_class=2)
    os.symlink(os.path.join(outside, "train", "class0"), os.path.join(root, "train", "class1",
                                                                      "more"))
    listing = data.list_split(root, "train")
    assert len(listing.paths) == 8 and np.bincount(listing.labels).tolist() == [3, 5]


def test_skipped_files_are_listed_and_counted_on_every_run_and_empty_classes_are_errors(tmp_path):
    """skipped.txt and summary.json name the undecodable files, from the cache too; a class left
    with no usable image is an error for a supervised stage."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    bad = tmp_path / "data" / "train" / "class1" / "broken.png"
    bad.write_bytes(b"not a png")
    for run in ("run", "again"):  # the second run reads the cache
        train.main(pretrain_argv(root, tmp_path / run, "--epochs", "1"))
        assert open(tmp_path / run / "skipped.txt").read() == f"{bad}\n"
        assert json.load(open(tmp_path / run / "summary.json"))["skipped_files"] == 1
    empty = make_folder(tmp_path / "e", classes=2, per_class=2)
    make_folder(tmp_path / "e", classes=2, per_class=2, split="val")
    for png in (tmp_path / "e" / "train" / "class1").iterdir():
        png.write_bytes(b"broken")
    with pytest.raises(SystemExit, match=r"class folder\(s\) \['class1'\] .* no usable training"):
        train.main(stage_argv("finetune", empty, tmp_path, "ft", "--arch", "resnet18"))


def test_the_cache_is_bounded_oldest_split_first(tmp_path, capsys):
    """prune_cache: beyond max_bytes the least recently used decoded split goes, the one in use
    stays."""
    cache = str(tmp_path / "cache")
    for name, seed in (("old", 0), ("new", 1)):
        root = make_folder(tmp_path / name, classes=1, per_class=4, size=(40, 40))
        data.load_split(data.list_split(root, "train"), 32, cache, max_bytes=1 << 30)
        os.utime(next(p for p in (tmp_path / "cache").glob(f"{name}*.npy")), (seed, seed))
    data.load_split(data.list_split(make_folder(tmp_path / "third", classes=1, per_class=4),
                                    "train"), 16, cache, max_bytes=20_000)
    left = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*.npy"))
    assert left == ["new", "third"] and "removed" in capsys.readouterr().out


def test_a_batch_that_drops_over_a_tenth_of_the_split_says_so(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=2, per_class=7)  # 14 images, batches of 8
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1", "--moco-k", "8"))
    assert "leave 6 of 14 images out of every epoch" in capsys.readouterr().out


def test_the_built_in_data_is_drawn_in_bounded_memory_at_any_size():
    """400 built-in images at 256 px (the linear probe's store at 224) peak well under 1 GB: they
    are drawn in chunks, uint8 at once (drawn whole, the float maps took over 4 GB)."""
    script = ("import data; images, _ = data.synthetic_dataset(400, 256, 0); "  # VmHWM: this
              "print(images.dtype, tuple(images.shape), [line.split()[1] for line in "  # process's
              "open('/proc/self/status') if line.startswith('VmHWM')][0])")  # peak, unlike maxrss
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), timeout=300)
    out = done.stdout
    assert out.startswith("torch.uint8 (400, 3, 256, 256)"), done.stderr[-2000:]
    assert int(out.split()[-1]) < 1_000_000, out  # peak resident KB


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    """--resume of a run that finished every epoch: exit 0 with a line saying so; summary.json,
    config.json, log.jsonl and the checkpoint are byte for byte as they were."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    argv = pretrain_argv(root, tmp_path / "run", "--epochs", "1")
    train.main(argv)
    files = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as stop:
        train.main(argv + ["--resume", str(tmp_path / "run" / "checkpoint.pt")])
    assert stop.value.code == 0 and "already finished its 1 epochs" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == files
    (tmp_path / "run" / "summary.json").unlink()  # stopped after its last checkpoint
    with pytest.raises(SystemExit, match="trained all its 1 epochs but wrote no summary.json"):
        train.main(argv + ["--resume", str(tmp_path / "run" / "checkpoint.pt")])


def test_a_full_disk_at_a_checkpoint_stops_with_one_line_and_leaves_no_temp_file(tmp_path,
                                                                                monkeypatch):
    """torch.save failing as on a full disk (it raises RuntimeError there) in epoch 2: one line
    naming the file, the free space and --save-dir; no .tmp left; epoch 1's checkpoint intact and
    log.jsonl holds only the epoch that reached the disk."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    save, calls = torch.save, []

    def failing_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            open(path, "wb").write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64")
        return save(obj, path, *a, **k)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(SystemExit, match=r"cannot write .*checkpoint.pt .*MiB free in .*save-dir"):
        train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "2"))
    assert not list((tmp_path / "run").glob("*.tmp"))
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "log.jsonl")] == [1]


def test_a_cache_on_a_disk_without_room_is_refused_before_writing(tmp_path, monkeypatch):
    """Too little free space for the decode buffer: one line naming --cache-dir and the remedies,
    before any file is written (a memory-mapped write past a full disk is a bus error)."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: shutil_usage(free=300 * 1024))
    with pytest.raises(SystemExit, match="needs up to .* in --cache-dir .* 0.3 MiB free.*"
                                         "--cache-max-gb"):
        train.main(pretrain_argv(root, tmp_path / "run"))
    assert not [p for p in (tmp_path / "cache").iterdir()]


def shutil_usage(free):
    return type("usage", (), dict(total=free, used=0, free=free))()


def test_a_damaged_cache_file_is_named_removed_and_decoded_again(tmp_path, capsys):
    """A truncated .npy or a corrupt .json in the cache: named, removed, the split decoded again;
    the run goes on."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1"))
    npy = next((tmp_path / "cache").glob("*.npy"))
    for damage in (lambda: npy.write_bytes(npy.read_bytes()[:200]),
                   lambda: npy.with_suffix(".json").write_text("{not json")):
        damage()
        capsys.readouterr()
        train.main(pretrain_argv(root, tmp_path / "again", "--epochs", "1"))
        out = capsys.readouterr().out
        assert f"cache {npy.with_suffix('')}.npy is damaged" in out and "decoded 16 images" in out
        shutil.rmtree(tmp_path / "again")


def test_odd_files_are_skipped_and_listed_and_a_looping_class_link_is_no_class(tmp_path):
    """A dangling link and an unreadable file with a name that is not UTF-8 are skipped and listed
    in skipped.txt; a class-folder link to the root is not a class; the run trains."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    os.symlink(tmp_path / "gone.png", tmp_path / "data" / "train" / "class0" / "dangling.png")
    (tmp_path / "data" / "train" / "class1").joinpath(os.fsdecode(b"bad\xff.png")).write_bytes(b"x")
    os.symlink("..", tmp_path / "data" / "train" / "loop")
    assert data.list_split(root, "train").classes == ["class0", "class1"]
    train.main(pretrain_argv(root, tmp_path / "run", "--epochs", "1"))
    skipped = (tmp_path / "run" / "skipped.txt").read_bytes().splitlines()
    assert sorted(os.path.basename(p) for p in skipped) == [b"bad\xff.png", b"dangling.png"]


# ----- train.py under torchrun: 2 processes on CPU (gloo) -----------------------------------------

# S3L's small architecture: BN over 4 images of layer4's 2 x 2 px amplifies float rounding (one
# process on 2 threads vs 1 differs by 4e-4 after 8 steps); without it 2 processes match 1 to 2e-6
TORCHRUN_ARGS = ("--method", "moco", "--small-stem", "--no-conv5", "--lr", "0.01", "--knn-every",
                 "1")

# run by torchrun: train.py, with a digest of every process's state after every epoch written next
# to this script (check_finite_weights runs on every process at the end of every epoch)
DIGESTING_TRAIN = """import os, sys
import runs, train
check = runs.check_finite_weights
def check_and_digest(module, epoch, *causes):
    check(module, epoch, *causes)
    name = f"rank{os.environ['RANK']}-epoch{epoch}"
    open(os.path.join(os.path.dirname(__file__), name), "w").write(
        runs.state_digest(module.state_dict()))
runs.check_finite_weights = check_and_digest
train.main(sys.argv[1:])
"""


def torchrun(argv, script=None, **popen):
    """`torchrun --standalone --nproc_per_node 2 train.py ARGV` (or `script`) as a child process,
    one thread a process."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=here, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               "2", script or os.path.join(here, "train.py"), *argv]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            **popen)


def finished(child, timeout=240):
    """(exit status, what it printed since) of a child, once it ends."""
    out = child.communicate(timeout=timeout)[0].decode()
    return child.returncode, out


def main_in_one_thread(argv):
    """train.main in this process with one thread, as each torchrun process runs: the same sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        torch.set_num_threads(threads)


def relative_difference(path_a, path_b, key="model"):
    """|a - b| / |a| over every float tensor of two checkpoints' `key`, as one vector."""
    a, b = (torch.load(p, weights_only=True)[key] for p in (path_a, path_b))
    assert a.keys() == b.keys()
    floats = [k for k in a if a[k].is_floating_point()]
    va, vb = (torch.cat([s[k].double().flatten() for k in floats]) for s in (a, b))
    return float((va - vb).norm() / va.norm())


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """MoCo pretrained for 2 epochs of 4 steps by 1 process (bn-batch 4: 2 BN groups) and by 2
    torchrun processes (one group each, their own cache: decoded once)."""
    tmp = tmp_path_factory.mktemp("torchrun")
    root = make_folder(tmp / "data", classes=2, per_class=16)
    make_folder(tmp / "data", classes=2, per_class=4, split="val")
    main_in_one_thread(pretrain_argv(root, tmp / "one", *TORCHRUN_ARGS))
    (tmp / "digests").mkdir()
    (tmp / "digests" / "digesting_train.py").write_text(DIGESTING_TRAIN)
    argv = pretrain_argv(root, tmp / "two", *TORCHRUN_ARGS, "--cache-dir", str(tmp / "own-cache"))
    status, out = finished(torchrun(argv, script=str(tmp / "digests" / "digesting_train.py")))
    assert status == 0, out[-3000:]
    return tmp, root, out


def test_two_processes_train_the_same_weights_as_one_with_the_same_bn_groups(two_processes):
    """--batch-size is global and each process draws the whole batch's views, keeping its share:
    2 processes x 4 images == 1 process x 8 images in BN groups of 4 (MoCo: keys gathered, shuffle
    over both processes), to float rounding; the same losses and kNN top-1 (computed on half the
    images by each process) every epoch."""
    tmp, _, _ = two_processes
    one, two = tmp / "one" / "checkpoint.pt", tmp / "two" / "checkpoint.pt"
    assert relative_difference(one, two) < 1e-4  # measured 2e-6
    logs = [[json.loads(line) for line in open(tmp / run / "log.jsonl")] for run in ("one", "two")]
    assert [r["epoch"] for r in logs[1]] == [1, 2]
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["knn_top1"] == a["knn_top1"]


def test_every_process_holds_bit_identical_weights_after_every_epoch(two_processes):
    """DDP keeps the online weights equal, so the momentum encoder (their EMA) and the queue (every
    process's keys) are equal too; BN statistics are rank 0's after each epoch."""
    digests = two_processes[0] / "digests"
    for epoch in (1, 2):
        assert (digests / f"rank0-epoch{epoch}").read_text() == \
            (digests / f"rank1-epoch{epoch}").read_text()


def test_only_rank_0_prints_and_writes_and_a_split_is_decoded_once_per_node(two_processes):
    """One config.json, log.jsonl (each epoch once), summary.json and checkpoint in --save-dir, and
    one progress line an epoch; rank 1 read the cache that rank 0 decoded."""
    tmp, _, out = two_processes
    assert sorted(os.listdir(tmp / "two")) == ["checkpoint.pt", "config.json", "health.png",
                                               "log.jsonl", "summary.json"]
    assert json.load(open(tmp / "two" / "config.json"))["world_size"] == 2
    assert json.load(open(tmp / "two" / "summary.json"))["knn_top1"] is not None
    assert out.count("epoch 2/2 step 4/4") == 1 and out.count("config: ") == 1
    assert out.count("decoding data-train") == 1 and out.count("decoding data-val") == 1


def test_ctrl_c_saves_a_checkpoint_that_two_processes_or_one_resume_exactly(two_processes):
    """Ctrl-C reaches the launcher and both processes: they stop after the same step (decided on an
    all-reduced flag), rank 0 saves the interrupted epoch; --resume with 2 processes reaches the
    uninterrupted 2-process run's weights exactly, with 1 (the random states are every process's)
    the 1-process run's to float rounding."""
    tmp, root, _ = two_processes
    argv = pretrain_argv(root, tmp / "killed", *TORCHRUN_ARGS)
    child, seen = torchrun(argv, start_new_session=True), b""
    while b"step 2/4" not in seen:  # progress lines end in \r: read what is there
        chunk = os.read(child.stdout.fileno(), 4096)
        assert chunk, seen.decode()[-3000:]
        seen += chunk
    os.killpg(child.pid, signal.SIGINT)  # the terminal's Ctrl-C
    status, out = finished(child)
    saved = torch.load(tmp / "killed" / "checkpoint.pt", weights_only=True)
    assert status != 0 and "step" in saved and saved["world_size"] == 2, out[-3000:]
    (tmp / "interrupted.pt").write_bytes((tmp / "killed" / "checkpoint.pt").read_bytes())
    status, out = finished(torchrun(argv + ["--resume", str(tmp / "interrupted.pt")]))
    assert status == 0, out[-3000:]
    main_in_one_thread(pretrain_argv(root, tmp / "killed-one", *TORCHRUN_ARGS, "--resume",
                                     str(tmp / "interrupted.pt")))
    assert same_weights(tmp / "killed" / "checkpoint.pt", tmp / "two" / "checkpoint.pt")
    one_process = tmp / "killed-one" / "checkpoint.pt"
    assert relative_difference(one_process, tmp / "one" / "checkpoint.pt") < 1e-4
    assert [json.loads(line)["epoch"] for line in open(tmp / "killed" / "log.jsonl")] == [1, 2]


def test_the_linear_probe_under_torchrun_equals_one_process(two_processes):
    """The official probe (random crops through the frozen backbone, BN in eval mode): 2 processes
    x 4 images train the fc of 1 x 8, and the test top-1, half the split on each, is the same."""
    tmp, root, _ = two_processes
    extra = ["--pretrained", str(tmp / "one" / "checkpoint.pt")]
    main_in_one_thread(stage_argv("linear", root, tmp, "linear-one", *extra))
    status, out = finished(torchrun(stage_argv("linear", root, tmp, "linear-two", *extra)))
    assert status == 0, out[-3000:]
    assert relative_difference(tmp / "linear-one" / "checkpoint.pt",
                               tmp / "linear-two" / "checkpoint.pt") < 1e-5
    one, two = (json.load(open(tmp / run / "summary.json")) for run in ("linear-one", "linear-two"))
    assert one["test_top1_final"] == two["test_top1_final"]


# ----- the S3L recipe: fine-tuning, warm-up, linear probe, subsets, export ------------------------

def test_mixup_mixes_images_and_losses_with_the_same_lambda_and_permutation():
    """x_mix = lam x + (1 - lam) x[perm]; the loss is lam CE(y) + (1 - lam) CE(y[perm]) with that
    lam/perm."""
    torch.manual_seed(0)
    x, y = randn(6, 3, 4, 4), torch.arange(6)
    mixed, y_a, y_b, lam = s3l.mixup(x, y, alpha=1.0)
    perm = y_b  # labels are the indices, so y[perm] reveals the permutation
    assert 0 <= lam <= 1 and torch.equal(y_a, y) and sorted(perm.tolist()) == list(range(6))
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[perm], atol=1e-6)
    logits = randn(6, 6, seed=1)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert torch.allclose(s3l.mixup_loss(logits, y_a, y_b, lam), expected)


def test_subsets_are_reproducible_from_the_seed_and_honour_their_counts():
    labels = [i % 5 for i in range(100)]  # 5 classes x 20
    per_class = data.subset_indices(labels, "per-class=3", seed=1)
    assert per_class == data.subset_indices(labels, "per-class=3", seed=1)
    assert per_class != data.subset_indices(labels, "per-class=3", seed=2)
    assert sorted(np.bincount([labels[i] for i in per_class]).tolist()) == [3] * 5
    assert len(set(data.subset_indices(labels, "total=17", seed=1))) == 17
    chosen = data.subset_indices(labels, "classes=2,total=10", seed=1)
    assert len(chosen) == 10 and len({labels[i] for i in chosen}) == 2
    with pytest.raises(ValueError, match="larger than the split"):
        data.subset_indices(labels, "total=101", seed=1)
    with pytest.raises(ValueError, match="has only 20 images"):
        data.subset_indices(labels, "per-class=21", seed=1)


def test_load_backbone_names_missing_and_unexpected_keys_instead_of_loading_in_part():
    r50 = runs.backbone_state(models.resnet50().state_dict())
    with pytest.raises(ValueError, match=r"missing keys: .*unexpected keys: layer1.0.conv3.weight"):
        runs.load_backbone(models.resnet18(), r50)


def test_backbone_state_strips_official_moco_and_byol_prefixes():
    """Official checkpoints: module.encoder_q.* (MoCo/SimCLR DDP), encoder_q.* (BYOL); heads, queue
    dropped."""
    sd = models.resnet18().state_dict()
    official = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    official.update({"module.encoder_q.fc.0.weight": torch.zeros(2, 2),
                     "module.queue": torch.zeros(2, 2),
                     "module.encoder_k.conv1.weight": torch.zeros(1)})
    assert runs.backbone_state(official).keys() == sd.keys()
    byol = {f"encoder_q.{k}": v for k, v in sd.items()} | {"projector.net.0.weight": torch.zeros(1)}
    assert runs.backbone_state(byol).keys() == sd.keys()


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
    """A tiny MoCo run without conv5 (the small architecture) and one with it, shared by the tests
    below."""
    tmp = tmp_path_factory.mktemp("pipeline")
    root = make_folder(tmp / "data", classes=2, per_class=8)
    make_folder(tmp / "data", classes=2, per_class=4, split="val")
    train.main(pretrain_argv(root, tmp / "small", "--no-conv5", "--epochs", "1"))
    train.main(pretrain_argv(root, tmp / "full", "--epochs", "1"))
    return tmp, root


def stage_argv(command, root, tmp, save, *extra):
    return [command, "--data", root, "--input-size", "16", "--epochs", "1", "--batch-size", "8",
            "--cache-dir", str(tmp / "cache"), "--save-dir", str(tmp / save), "--print-freq", "1",
            *extra]


def test_the_linear_probe_trains_on_random_resized_crops_and_fine_tuning_on_resize_crop():
    """The official CUB linear script: RandomResizedCrop (area 0.08-1) + flip; fine-tuning:
    Resize -> RandomCrop + flip, whose crops all have the input's size at the resized scale."""
    assert train.parse_args(["linear", "--data", "x"]).random_resized_crop is True
    assert train.parse_args(["linear"]).random_resized_crop is False  # the built-in 32 px shapes
    assert train.parse_args(["finetune", "--data", "x"]).random_resized_crop is False
    sizes = torch.tensor([[64, 80]] * 2000)
    rrc = augment.finetune_train_params(sizes, 32, gen(0), random_resized_crop=True)["boxes"]
    fixed = augment.finetune_train_params(sizes, 32, gen(0))["boxes"]
    area = lambda boxes: (boxes[:, 2] * boxes[:, 3]) / (64 * 80)  # noqa: E731
    assert area(rrc).min() < 0.1 and area(rrc).max() > 0.9
    assert area(fixed).std() < 1e-6


def test_stages_without_data_run_on_the_built_in_shapes_at_the_checkpoints_size(pretrained_run):
    """The default job's follow-ups need no --data: knn and linear on a 16 px checkpoint run on
    the built-in shapes at 16 px, not the linear probe's 224."""
    tmp, _ = pretrained_run
    ckpt = str(tmp / "full" / "checkpoint.pt")
    train.main(["knn", "--pretrained", ckpt, "--save-dir", str(tmp / "knn-builtin")])
    summary = json.load(open(tmp / "knn-builtin" / "summary.json"))
    assert summary["input_size"] == 16 and summary["bank"] == 2000
    train.main(["linear", "--pretrained", ckpt, "--epochs", "1", "--cached-features",
                "--save-dir", str(tmp / "linear-builtin")])
    assert json.load(open(tmp / "linear-builtin" / "summary.json"))["input_size"] == 16


def test_warmup_trains_only_conv5_and_fc(pretrained_run):
    """conv1-4 come from the small-architecture checkpoint and stay bit-identical; layer4 and fc
    move."""
    tmp, root = pretrained_run
    train.main(stage_argv("warmup-conv5", root, tmp, "warmup", "--pretrained", str(tmp / "small" /
                                                                                   "checkpoint.pt"),
                          "--frozen-bn-eval"))
    small = torch.load(tmp / "small" / "checkpoint.pt", weights_only=True)["model"]
    ssl = runs.backbone_state(small)
    warm = torch.load(tmp / "warmup" / "checkpoint.pt", weights_only=True)["model"]
    for key, value in ssl.items():
        # weights and, with --frozen-bn-eval, BN statistics
        assert torch.equal(warm[key], value), key
    # the warm-up's own initialisation (--seed 0): layer4 must have moved from it
    torch.manual_seed(0)
    fresh = models.resnet18(num_classes=2).state_dict()
    assert all(not torch.equal(warm[k], fresh[k]) for k in warm if k.startswith("layer4.") and
               k.endswith("conv1.weight"))


def test_linear_probe_leaves_the_backbone_bit_identical(pretrained_run):
    tmp, root = pretrained_run
    ckpt = str(tmp / "full" / "checkpoint.pt")
    train.main(stage_argv("linear", root, tmp, "linear", "--pretrained", ckpt, "--epochs", "2"))
    ssl = runs.backbone_state(torch.load(ckpt, weights_only=True)["model"])
    probe = torch.load(tmp / "linear" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(probe[k], v) for k, v in ssl.items())
    assert probe["fc.weight"].shape == (2, 512)


def test_init_from_loads_every_weight_of_the_earlier_stage(pretrained_run, monkeypatch):
    """Multi-stage resolution: stage 2 starts from all of stage 1's weights, queue included."""
    tmp, root = pretrained_run
    loaded = {}
    original = train.init_from

    def spy(method, *args):
        stages = original(method, *args)
        loaded.update({k: v.clone() for k, v in method.state_dict().items()})
        return stages
    monkeypatch.setattr(train, "init_from", spy)
    train.main(pretrain_argv(root, tmp / "stage2", "--input-size", "24", "--epochs", "1",
                             "--init-from", str(tmp / "full" / "checkpoint.pt")))
    stage1 = torch.load(tmp / "full" / "checkpoint.pt", weights_only=True)["model"]
    assert loaded.keys() == stage1.keys() and all(torch.equal(loaded[k], stage1[k]) for k in stage1)
    summary = json.load(open(tmp / "stage2" / "summary.json"))
    assert [s["input_size"] for s in summary["stages"]] == [16, 24]


def test_exported_backbone_loads_strictly_and_gives_identical_outputs(pretrained_run):
    tmp, _ = pretrained_run
    ckpt = tmp / "small" / "checkpoint.pt"
    train.main(["export", str(ckpt), str(tmp / "export.pt")])
    fresh = models.resnet18(conv5=False).eval()
    fresh.load_state_dict(torch.load(tmp / "export.pt", weights_only=True), strict=True)
    moco = s3l.MoCo(models.resnet18(conv5=False), dim=128, moco_k=16, bn_splits=2)
    moco.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    x = randn(2, 3, 32, 32)
    assert torch.equal(fresh.forward_features(x), moco.encoder_q.eval().forward_features(x))


def test_export_never_overwrites_its_input_or_another_training_checkpoint(pretrained_run):
    """`export X X`, or an output that holds a training checkpoint: refused by name, file kept."""
    tmp, _ = pretrained_run
    ckpt = tmp / "small" / "checkpoint.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit, match="is the checkpoint it reads.*another output path"):
        train.main(["export", str(ckpt), str(ckpt)])
    with pytest.raises(SystemExit, match="is a training checkpoint"):
        train.main(["export", str(tmp / "full" / "checkpoint.pt"), str(ckpt)])
    assert ckpt.read_bytes() == before and not list((tmp / "small").glob("*.tmp"))


def test_wrong_architecture_checkpoint_fails_with_what_was_expected_and_found(pretrained_run):
    tmp, root = pretrained_run
    with pytest.raises(SystemExit, match="holds a resnet18 backbone .* but --arch resnet50 was"):
        train.main(stage_argv("finetune", root, tmp, "wrong", "--pretrained",
                              str(tmp / "full" / "checkpoint.pt"), "--arch", "resnet50"))
    (tmp / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        train.main(stage_argv("finetune", root, tmp, "wrong", "--pretrained",
                              str(tmp / "corrupt.pt")))


def test_finetune_reports_final_and_best_epoch_and_writes_the_subset_list(pretrained_run):
    tmp, root = pretrained_run
    train.main(stage_argv("finetune", root, tmp, "ft", "--pretrained",
                          str(tmp / "full" / "checkpoint.pt"), "--epochs", "2", "--subset",
                          "per-class=4", "--bn-batch", "4"))
    summary = json.load(open(tmp / "ft" / "summary.json"))
    assert summary["test_top1_final"] is not None and summary["best_epoch"] in (1, 2)
    assert len(open(tmp / "ft" / "subset.txt").read().split()) == 8
    assert [s["command"] for s in summary["stages"]] == ["pretrain", "finetune"]


def test_no_conv5_means_a_fresh_conv5_for_finetune_and_conv1_to_4_for_the_probe(pretrained_run):
    """finetune --no-conv5 (the official ablation) loads conv1-4 only; linear --no-conv5 probes the
    256-d conv4 features of a full checkpoint."""
    tmp, root = pretrained_run
    ckpt = str(tmp / "full" / "checkpoint.pt")
    train.main(stage_argv("finetune", root, tmp, "ft-fresh", "--pretrained", ckpt, "--no-conv5",
                          "--epochs", "1", "--lr", "0"))
    ssl = runs.backbone_state(torch.load(ckpt, weights_only=True)["model"])
    tuned = torch.load(tmp / "ft-fresh" / "checkpoint.pt", weights_only=True)["model"]
    assert torch.equal(tuned["layer3.1.conv2.weight"], ssl["layer3.1.conv2.weight"])  # lr 0
    assert not torch.equal(tuned["layer4.0.conv1.weight"], ssl["layer4.0.conv1.weight"])
    train.main(stage_argv("linear", root, tmp, "lin-conv4", "--pretrained", ckpt, "--no-conv5",
                          "--cached-features"))
    probe = torch.load(tmp / "lin-conv4" / "checkpoint.pt", weights_only=True)["model"]
    assert probe["fc.weight"].shape == (2, 256) and "layer4.0.conv1.weight" not in probe


def test_a_class_missing_in_the_test_split_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "data", classes=3, per_class=2)
    make_folder(tmp_path / "data", classes=2, per_class=2, split="val")
    with pytest.raises(SystemExit, match=r"missing \['class2'\]"):
        train.main(stage_argv("finetune", root, tmp_path, "ft", "--arch", "resnet18"))


# ----- bench.py -----------------------------------------------------------------------------------

def test_bench_prints_every_row_as_measured_and_in_the_table_with_positive_finite_rates(
        tmp_path, capsys):
    """Each row is printed when measured (a run cut short by a time limit keeps them), then the
    table with the ratios."""
    import bench
    args = bench.build_parser().parse_args(
        ["--input-size", "16", "--batch-size", "8", "--images", "16", "--gen-size", "24",
         "--steps", "1", "--warmup", "1", "--workers", "1", "--cache-dir", str(tmp_path),
         "--profile"])
    rows = bench.run(args)
    expected = [("augment", "s3l batched"), ("augment", "PIL per image"),
                ("augment", "PIL decode+aug")] + [
        (m, p) for m in ("moco", "simclr", "byol")
        for p in ("floor", "s3l", "s3l + health", "conventional")]
    assert [(m, p) for m, p, _ in rows] == expected
    assert all(math.isfinite(rate) and rate > 0 for _, _, rate in rows)
    printed = capsys.readouterr().out
    progress, table = printed.split("x conventional")
    assert all(f"  {m:<10}{p:<16}" in progress for m, p in expected)
    assert all(f"\n{m:<10}{p:<16}" in table for m, p in expected)
    assert "Self CPU" in printed  # the --profile table of the full step
    for m in ("moco", "simclr", "byol"):  # how close to the hardware, per method
        assert re.search(rf"  {m}: [0-9.]+ TFLOP/s \(2 x .* passes .*% of the bf16 matmul rate "
                         r".*per step \d+ aten ops, \d+ batch_norm calls", printed), m
        assert re.search(rf"  {m}: health measures [0-9.]+ ms every 10 steps of [0-9]+ ms = "
                         r"[0-9.]+ % of the step", printed), m


def test_bench_counts_a_cuda_graphs_kernels_apart_from_its_one_host_launch():
    """bench's launch count: on CUDA, device kernels and the host calls that start them, so a
    replayed CUDA graph shows many kernels from one launch; on a CPU, aten ops."""
    import bench
    from types import SimpleNamespace as Event
    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    graphed = [Event(name="cudaGraphLaunch", device_type=cpu)] + [
        Event(name=k, device_type=gpu) for k in ("conv_kernel", "bn_fw_kernel", "sgd_kernel")]
    eager = [Event(name="cudaLaunchKernel", device_type=cpu) for _ in range(3)] + graphed[1:] + [
        Event(name="aten::cudnn_batch_norm", device_type=cpu)]
    assert bench.count_launches(graphed, cuda=True) == (3, 1, 0)
    assert bench.count_launches(eager, cuda=True) == (3, 3, 1)
    ops = [Event(name=n, device_type=cpu) for n in ("aten::conv2d", "aten::native_batch_norm",
                                                    "other")]
    assert bench.count_launches(ops, cuda=False) == (2, 2, 1)


# ----- the project's shape: imports point one way ------------------------------------------------

def project_imports():
    """{module: the project modules it imports}, read off every top-level .py file but the tests."""
    root = os.path.dirname(os.path.abspath(__file__))
    modules = {f[:-3] for f in os.listdir(root) if f.endswith(".py") and not f.startswith("test_")}
    graph = {}
    for m in modules:
        tree = ast.parse(open(os.path.join(root, f"{m}.py")).read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        graph[m] = names & modules
    return graph


def test_no_module_imports_study_or_bench_and_no_import_circle_exists():
    """study.py and bench.py are leaves (their own entry points); every import points one way."""
    graph = project_imports()
    assert {"study", "bench", "train", "s3l", "augment"} <= set(graph), graph
    assert not [m for m, deps in graph.items() if deps & {"study", "bench"}], graph

    def reaches(a, b, seen=()):
        return any(d == b or (d not in seen and reaches(d, b, seen + (d,))) for d in graph[a])
    assert not [m for m in graph if reaches(m, m)], graph


def test_bench_calls_the_training_steps_of_train_py_and_has_no_step_of_its_own():
    """What bench.py times is what train.py runs: no backward pass is written in bench.py."""
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py")).read()
    assert ".backward(" not in src and "train.pretrain_step(" in src


# ----- README.md: its links resolve, and its pieces run copied alone ------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    return text.split(f"\n## {title}\n")[1].split("\n## ")[0]


def github_anchor(heading):
    return "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")


def test_every_relative_link_of_the_readme_resolves():
    """[text](file) and [text](file#section) / (#section) point at files and headings that exist."""
    text = open(os.path.join(ROOT, "README.md")).read()
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    assert links, "the README has relative links"
    for link in links:
        path, _, anchor = link.partition("#")
        target = os.path.join(ROOT, path) if path else os.path.join(ROOT, "README.md")
        assert os.path.isfile(target), link
        if anchor:
            headings = re.findall(r"^#+ (.+)$", open(target).read(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, link


def copied_definitions(file, cell):
    """The top-level definitions of `file` that a README cell names: `a`, `b`, ... or the block
    from `a` to `b`."""
    src = open(os.path.join(ROOT, file)).read()
    names = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cell)
    nodes = [n for n in ast.parse(src).body if isinstance(n, (ast.FunctionDef, ast.ClassDef,
                                                               ast.Assign))]
    def name(n):
        return n.targets[0].id if isinstance(n, ast.Assign) else n.name
    order = [name(n) for n in nodes]
    if " to " in cell:
        names = order[order.index(names[0]):order.index(names[1]) + 1]
    lines = src.splitlines()
    blocks = []
    for n in nodes:
        if name(n) in names:
            first = n.decorator_list[0].lineno if getattr(n, "decorator_list", None) else n.lineno
            blocks.append("\n".join(lines[first - 1:n.end_lineno]))
    assert len(blocks) == len(names), (file, cell)
    return blocks


def test_the_pieces_the_readme_names_run_copied_into_a_module_alone(tmp_path):
    """'Using a piece': the definitions each row names, copied with the imports the README lists
    into one module, import and run in a Python that cannot see this project."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in
            readme_section("Using a piece in your own project").splitlines()
            if line.startswith("| ") and ".py`" in line]
    code = ["import copy, functools, math", "from dataclasses import dataclass", "import torch",
            "import torch.nn as nn", "import torch.nn.functional as F",
            "import torch.distributed as dist"]
    for piece, file, cell in rows:
        code += copied_definitions(file.strip("`"), cell)
    (tmp_path / "pieces.py").write_text("\n\n\n".join(code) + "\n")
    script = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import torch, pieces as p\n"
              "g = torch.Generator().manual_seed(0)\n"
              "assert p.nt_xent(torch.randn(4, 8), torch.randn(4, 8), 0.1).item() > 0\n"
              "assert p.resnet18(conv5=False)(torch.randn(2, 3, 32, 32)).shape == (2, 256)\n"
              "x = torch.randint(0, 256, (4, 3, 24, 32), dtype=torch.uint8)\n"
              "x = torch.nn.functional.pad(x, (0, 0, 0, 8))\n"
              "sizes = torch.tensor([[24, 32]] * 4)\n"
              "views = [p.SSLAugment(16)(x, sizes, g) for _ in range(2)]\n"
              "assert views[0].shape == (4, 3, 16, 16)\n"
              "moco = p.MoCo(p.resnet18(), moco_k=8, bn_splits=2)\n"
              "moco(*views).backward()\n"
              "health = p.measure(moco.outputs)  # label-free health of the step's outputs\n"
              "assert 1 <= health['rank'].item() <= 4 and health['uniform'].item() <= 0\n"
              "print('pieces ok', sorted(set(sys.modules) & {'s3l', 'data', 'models', 'health'}))")
    out = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "pieces ok []" in out.stdout, out.stderr[-2000:]
    assert len(rows) == 5


# ----- the study: grids of commands, cost accounting, report (study.py) ---------------------------

def study_argv(root, tmp, *extra):
    return ["--data", root, "--full-size", "64", "--epochs", "1", "--eval", "knn", "--arch",
            "resnet18", "--batch-size", "8", "--moco-k", "16", "--bn-batch", "4", "--print-freq",
            "1", "--cache-dir", str(tmp / "cache"), "--save-dir", str(tmp / "study"), *extra]


def test_a_tiny_study_reports_a_quarter_of_the_flops_at_half_size_and_reuses_finished_arms(
        tmp_path):
    """Two arms of the resolution grid and one failing arm of the data grid, one epoch each: the
    report and plots exist; half resolution costs a quarter of the PFLOPs (2 x MACs x 4 passes x
    images, MoCo); the failing arm is recorded with its error while the others finish; a second run
    trains nothing it already has, and other settings are refused."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8, size=(80, 64))
    make_folder(tmp_path / "data", classes=2, per_class=4, size=(80, 64), split="val")
    argv = study_argv(root, tmp_path, "--grid", "resolution,data", "--subsets", "total=1000",
                      "--arms", "full-64,half-32,total-1000-32")
    first = study.main(argv)
    folder = tmp_path / "study"
    for name in ("results.md", "results.json", "compute_knn.png", "loss.png", "knn.png",
                 "rank.png"):
        assert (folder / name).exists(), f"the study wrote no {name}"
    assert Image.open(folder / "compute_knn.png").size == (900, 520)
    results = json.loads((folder / "results.json").read_text())
    rows = {r["arm"]: r for r in results["arms"]}
    full, half = rows["full-64"]["pretrain_pflops"], rows["half-32"]["pretrain_pflops"]
    macs = models.macs(models.resnet18(num_classes=0), 64)
    assert full == pytest.approx(2 * macs * 4 * 16 / 1e15, rel=1e-3), "PFLOPs not 2 x MACs x passes"
    assert half / full == pytest.approx(0.25, rel=0.05), f"half-size PFLOPs are {half / full:.3f} x"
    assert rows["full-64"]["knn"][0] is not None and rows["half-32"]["knn"][0] is not None
    full_run = [r for r in results["runs"] if r["arm"] == "full-64"][0]
    log = [json.loads(line) for line in open(full_run["steps"][0]["folder"] + "/log.jsonl")]
    assert rows["full-64"]["epoch_s"] == log[0]["epoch_s"] > 0  # its one epoch's seconds
    assert "pretrain s/epoch (median)" in (folder / "results.md").read_text()
    failed = [r for r in results["runs"] if r["arm"] == "total-1000-32"][0]
    assert failed["status"] == "failed" and "larger than the split" in failed["errors"]["pretrain"]
    assert "total-1000-32 failed" in (folder / "results.md").read_text()
    summaries = sorted(folder.glob("steps/*/summary.json"))
    assert first["steps_run"] == len(summaries) == 4  # 2 pretraining + 2 kNN; the failure has none
    stamps = [p.stat().st_mtime_ns for p in summaries]
    again = study.main(argv)
    assert again["steps_run"] == 0, "a second run trained again"
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    with pytest.raises(SystemExit, match="other settings"):
        study.main(study_argv(root, tmp_path, "--grid", "resolution", "--arms", "full-64",
                              "--epochs", "2"))


def test_study_flags_go_to_the_stages_that_take_them_and_the_rest_are_refused():
    """--arch reaches every stage, --lr the trained ones, --moco-k only pretraining; a flag no stage
    knows, or one the study sets per arm, is an error naming it."""
    stages = study.forwarded_args(["--arch", "resnet18", "--lr", "0.1", "--moco-k", "64"])
    assert all("--arch" in stages[s] for s in study.STAGES)
    assert "--lr" in stages["finetune"] and "--lr" not in stages["knn"]
    assert stages["pretrain"][-2:] == ["--moco-k", "64"] and "--moco-k" not in stages["finetune"]
    with pytest.raises(SystemExit, match="--no-such-flag"):
        study.forwarded_args(["--no-such-flag", "1"])
    with pytest.raises(SystemExit, match="--input-size is set by the study"):
        study.forwarded_args(["--input-size", "32"])
    with pytest.raises(SystemExit, match="--seed is set by the study"):  # not taken for --seeds
        study.resolve(["--data", "x", "--seed", "1"])


def test_method_args_reach_only_that_methods_pretraining_and_old_study_folders_still_open(
        tmp_path):
    """--moco-args comes after --pretrain-args in MoCo's pretraining commands only, so MoCo runs at
    its own lr in the method grid; a study.json written before --<method>-args is still accepted."""
    s = study.resolve(["--data", "x", "--grid", "method", "--save-dir", str(tmp_path),
                       "--pretrain-args", "--lr 0.125", "--moco-args", "--lr 0.03 --moco-k 1024"])
    argvs = {arm.name: study.arm_steps(arm, 0, s, [5])[0][0].argv
             for arm in study.grid_arms("method", s)}
    assert argvs["moco-112"][-4:] == ("--lr", "0.03", "--moco-k", "1024")
    assert train.parse_args(list(argvs["moco-112"])).lr == 0.03  # the last --lr wins
    assert argvs["simclr-112"][-2:] == ("--lr", "0.125") and "--moco-k" not in argvs["byol-112"]
    old = {k: s[k] for k in study.DEFINING if k != "method_args"}
    (tmp_path / "study.json").write_text(json.dumps(old))
    study.check_study_folder(dict(s, method_args={}))
    with pytest.raises(SystemExit, match="method_args"):
        study.check_study_folder(s)


def test_a_fraction_subset_takes_that_share_of_every_class():
    labels = [0] * 10 + [1] * 4
    chosen = data.subset_indices(labels, "fraction=0.5", seed=0)
    assert sum(labels[i] == 0 for i in chosen) == 5 and sum(labels[i] == 1 for i in chosen) == 2
    assert chosen == data.subset_indices(labels, "fraction=0.5", seed=0)  # seeded
    with pytest.raises(ValueError, match="fraction"):
        data.subset_indices(labels, "fraction=1.5", seed=0)


def test_arms_that_share_every_step_are_one_point_of_the_compute_plot(tmp_path, monkeypatch):
    """half-32, conv5-32 and all-32 run the same commands: one point, one legend entry naming all
    three (drawn apart, the last would hide the others); other arms keep their own point."""
    import study
    drawn = {}
    monkeypatch.setattr(study, "plot", lambda path, series, *a, **k: drawn.setdefault(
        os.path.basename(path), series))
    rows = [dict(grid=g, arm=a, pretrain_pflops=0.017, knn=(12.4, 0.24))
            for g, a in (("resolution", "half-32"), ("architecture", "conv5-32"),
                         ("data", "all-32"))]
    rows.append(dict(grid="data", arm="fraction-0.5-32", pretrain_pflops=0.008, knn=(10.3, 0.76)))
    study.draw_plots(str(tmp_path), rows, records=[], evals=["knn"])
    assert [s["label"] for s in drawn["compute_knn.png"]] == ["half-32 = conv5-32 = all-32",
                                                            "fraction-0.5-32"]
    assert drawn["compute_knn.png"][0]["x"] == [0.017]
    assert drawn["compute_knn.png"][0]["y"] == [12.4]


def test_a_multi_stage_curve_is_drawn_before_the_arm_that_is_its_first_stage(tmp_path,
                                                                          monkeypatch):
    """half-32-then-64 starts with half-32's very pretraining: drawn after it, its line would hide
    half-32's; drawn first, half-32's line lies on top and the second stage continues it."""
    import study
    drawn = {}
    monkeypatch.setattr(study, "plot", lambda path, series, *a, **k: drawn.setdefault(
        os.path.basename(path), series))
    first, second = dict(kind="pretrain", folder="p32"), dict(kind="pretrain", folder="p64")
    records = [dict(arm="half-32", steps=[first], curves=dict(knn=[[5, 10.0], [10, 12.0]])),
               dict(arm="half-32-then-64", steps=[first, second],
                    curves=dict(knn=[[5, 10.0], [10, 12.0], [15, 13.0]]))]
    study.draw_plots(str(tmp_path), rows=[], records=records, evals=[])
    assert [s["label"] for s in drawn["knn.png"]] == ["half-32-then-64", "half-32"]


def test_a_study_stopped_by_sigterm_resumes_the_stopped_command_on_the_next_run(tmp_path, capsys):
    """SIGTERM to the study reaches the running command, which saves its step; the study exits
    non-zero saying how to continue; the same command line resumes that command from its checkpoint
    (each epoch logged once) and finishes the arm."""
    root = make_folder(tmp_path / "data", classes=2, per_class=16, size=(80, 64))
    make_folder(tmp_path / "data", classes=2, per_class=4, size=(80, 64), split="val")
    argv = study_argv(root, tmp_path, "--grid", "resolution", "--arms", "half-32", "--epochs", "3")
    child = run_child(argv, cwd=tmp_path, script="study.py")
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the pretraining command trains
        logs = list((tmp_path / "study" / "steps").glob("pretrain-*/output.txt"))
        if logs and "step 2/" in logs[0].read_text():
            break
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    out = child.communicate(timeout=120)[0]
    assert child.returncode not in (0, None) and "the same command continues it" in out, out
    assert "step" in torch.load(logs[0].parent / "checkpoint.pt", weights_only=True)
    result = study.main(argv)
    assert "resume pretrain" in capsys.readouterr().out
    assert result["records"][0]["status"] == "ok"
    epochs = [json.loads(line)["epoch"] for line in open(logs[0].parent / "log.jsonl")]
    assert epochs == [1, 2, 3]


def test_an_equal_compute_budget_gives_each_arm_the_epochs_that_cost_it(tmp_path):
    """--budget-pflops X: the half-size arm gets 4x the full-size arm's epochs, and the multi-stage
    arm's two stages together cost X to within one epoch."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8, size=(80, 64))
    s = study.resolve(study_argv(root, tmp_path, "--budget-pflops", "1e-3", "--stage2-epochs", "5"))
    arms = {a.name: a for a in study.grid_arms("resolution", s)}

    def per_epoch(flags):
        return study.pretrain_pflops_per_epoch(["pretrain", "--data", root, *flags,
                                                *s["stage_args"]["pretrain"]])
    full, half = (study.budget_epochs(arms[n], s)[0] for n in ("full-64", "half-32"))
    assert full == round(1e-3 / per_epoch(arms["full-64"].pretrain[0]))
    assert half / full == pytest.approx(4, rel=0.05)
    chained = arms["half-32-then-64"]
    first = study.budget_epochs(chained, s)[0]
    cost = first * per_epoch(chained.pretrain[0]) + 5 * per_epoch(chained.pretrain[1])
    assert abs(cost - 1e-3) <= per_epoch(chained.pretrain[0])
