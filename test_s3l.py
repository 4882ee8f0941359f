"""Specifications of the maths, in the order of the paper's modules: models (ResNets), s3l (losses,
heads, per-GPU BN, methods, several processes), augment (the batched views) and health (label-free
measures). Tiny seeded CPU inputs; oracles are written out naively here (nt_xent_by_loops, ...).

Run: python -m pytest -q
"""
import ast
import copy
import datetime
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

import augment
import cli
import health
import models
import s3l
import train

from conftest import gen, make_folder, pretrain_argv, randn


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
        assert float(byol(view1, view2)[0]) == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("method", ["moco", "simclr", "byol"])
def test_every_method_returns_a_finite_loss_that_trains_the_backbone(method):
    """forward(view1, view2) -> (scalar loss, outputs): the health measures' detached features
    (N, d) and projections z1, z2 (N, dim); a backward step changes the backbone's conv1
    (gradients flow)."""
    torch.manual_seed(0)
    kwargs = dict(moco=dict(moco_k=8), simclr={}, byol=dict(hidden_dim=32))[method]
    model = s3l.METHODS[method](models.resnet18(), dim=8, bn_splits=2, **kwargs)
    before = model.backbone.conv1.weight.clone()
    loss, outputs = model(randn(4, 3, 16, 16), randn(4, 3, 16, 16, seed=1))
    assert loss.shape == () and torch.isfinite(loss)
    assert outputs["features"].shape == (4, 512) and outputs["z1"].shape == (4, 8) == \
        outputs["z2"].shape and not any(t.requires_grad for t in outputs.values())
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(before, model.backbone.conv1.weight)


def test_the_simclr_bn_head_is_linear_bn_relu_linear_bn_without_biases_in_bn_groups():
    """--head mlp-bn: exactly Linear(bias=False)-BN-ReLU-Linear(bias=False)-BN, the BN layers split
    into --bn-batch groups like every other BN; the default stays the official head (biases, no
    BN)."""
    args = cli.parse_args(["pretrain", "--method", "simclr", "--head", "mlp-bn", "--arch",
                             "resnet18", "--batch-size", "64", "--bn-batch", "16"])
    fc = train.build_method(args, models.resnet18()).encoder.fc
    assert [type(m).__name__ for m in fc] == ["Linear", "SplitBatchNorm", "ReLU", "Linear",
                                              "SplitBatchNorm"]
    assert fc[0].bias is None and fc[3].bias is None and fc[0].in_features == 512
    assert fc[1].num_splits == fc[4].num_splits == 4 and fc[4].num_features == 128
    default = cli.parse_args(["pretrain", "--method", "simclr", "--arch", "resnet18"])
    assert default.head == "mlp"
    fc = train.build_method(default, models.resnet18()).encoder.fc
    assert [type(m).__name__ for m in fc] == ["Linear", "ReLU", "Linear"]
    assert fc[0].bias is not None and fc[2].bias is not None
    moco = train.build_method(cli.parse_args(["pretrain", "--head", "mlp-bn", "--arch",
                                                "resnet18"]), models.resnet18())
    assert type(moco.encoder_k.fc[4]).__name__ == "SplitBatchNorm"


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
        losses.append(model(view1, view2)[0].detach())
    assert torch.equal(losses[0], losses[1])


def one_step(method, view1, view2, bn_splits, ddp=False):
    """One seeded forward + backward: the loss, two gradients and (MoCo) the queue after it."""
    torch.manual_seed(0)
    kwargs = dict(moco=dict(moco_k=16), simclr={})[method]
    model = s3l.METHODS[method](models.resnet18(), dim=8, bn_splits=bn_splits, **kwargs)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    torch.manual_seed(1 + dist.get_rank() if ddp else 1)  # rank 1's own shuffle must not count
    loss = net(view1, view2)[0]
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
