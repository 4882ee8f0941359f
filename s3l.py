"""Self-supervised methods and the S3L recipe, in reading order: losses, heads, methods, recipe.

Sources: S3L, Cao & Wu 2021, "Rethinking Self-Supervised Learning: Small is Beautiful" (arXiv
2103.13559) and its official code, whose settings the docstrings quote; SimCLR (Chen et al. 2020,
arXiv 2002.05709); MoCo (He et al. 2020, arXiv 1911.05722) and MoCo v2 (Chen et al. 2020b, arXiv
2003.04297); BYOL (Grill et al. 2020, arXiv 2006.07733); mixup (Zhang et al. 2018, arXiv
1710.09412).

  losses   nt_xent (nt_xent_gathered: several processes), info_nce, byol_loss,
           momentum_update_  (fp32 even under autocast)
  ranks    rank_and_world_size, concat_all_gather, gather_with_grad  (no-ops in one process)
  heads    mlp, mlp_bn, HEADS, SplitBatchNorm, group_views, ungroup_views, split_batchnorm_,
           fold_split_batchnorm_
  methods  SimCLR, MoCo, BYOL, METHODS  (each forward(view1, view2) -> loss, outputs: one loop
           trains all; outputs: detached view-1 features (N, d), z1, z2 (N, dim), for health)
  eval     knn_top1
  recipe   freeze_all_but_conv5 (small architecture: conv1-4 from SSL, a fresh conv5 warmed up),
           mixup, mixup_loss, classifier_loss (fine-tuning with mixup); set_lr, lr_at (warm-up,
           then cosine, or steps). Backbones move between stages through runs.py's checkpoints.

Encoders are passed in (any module with `fc` and `forward_features`, e.g. models.resnet18()); this
file does no file I/O and no printing. Several processes (torchrun + DDP) are optional: without an
initialised process group every method runs as one process, with per-"GPU" BN emulated by
SplitBatchNorm.
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----- losses -------------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020, Sec. 2.1, Eq. 1), in fp32 even under autocast.

    z1, z2: (N, D) projections of two views; row i of each comes from the same image.
    Each of the 2N rows is an anchor with one positive (its other view) and 2N - 2 negatives.
    Returns the mean over the 2N anchors. Inputs are L2-normalised here, not by the caller.
    """
    n = z1.shape[0]
    # fp32: a bf16 cosine carries ~3 significant digits, and 1 / temperature multiplies its error
    with torch.autocast(z1.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
        # the same rows as candidates, computed apart as nt_xent_gathered does: both forms then sum
        # their gradients in one order and train bit for bit alike
        candidates = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
        sim = anchors @ candidates.T / temperature  # (2N, 2N)
        # an anchor is never its own negative: -inf on the diagonal drops it from the denominator
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=sim.device)
        positive = torch.arange(2 * n, device=sim.device).roll(n)  # row i's other view: i +- N
        return F.cross_entropy(sim.masked_fill(self_mask, float("-inf")), positive)


def nt_xent_gathered(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
                     z1_all: torch.Tensor, z2_all: torch.Tensor, rank: int) -> torch.Tensor:
    """nt_xent of one of several processes: its 2N anchors against the rows of every process.

    z1, z2: (N, D) this rank's projections; z1_all, z2_all: (M, D) every rank's, in rank order,
    this rank's rows at rank * N. Each anchor has 2M - 2 negatives; the mean over the ranks of
    their losses is nt_xent of the whole batch (with gather_with_grad, so are the gradients).
    """
    n, m = z1.shape[0], z1_all.shape[0]
    with torch.autocast(z1.device.type, enabled=False):  # fp32, as nt_xent
        anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
        candidates = F.normalize(torch.cat([z1_all, z2_all]).float(), dim=1)  # (2M, D)
        sim = anchors @ candidates.T / temperature  # (2N, 2M)
        # image i of this rank is row `own` of each view's block; its other view is M rows away
        own = rank * n + torch.arange(n, device=sim.device)  # (N,)
        self_idx, pos_idx = torch.cat([own, own + m]), torch.cat([own + m, own])  # (2N,) each
        self_mask = torch.arange(2 * m, device=sim.device) == self_idx[:, None]  # (2N, 2M)
        return F.cross_entropy(sim.masked_fill(self_mask, float("-inf")), pos_idx)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE loss (He et al. 2020, Eq. 1 and Algorithm 1), in fp32 even under autocast.

    q: (N, D) queries; k: (N, D) their positive keys (gradient-free); queue: (D, K) negative keys,
    already L2-normalised. q and k are L2-normalised here. Returns the mean (1 + K)-way CE.
    """
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits, as in nt_xent
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
        l_neg = q @ queue.float()  # (N, K)
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
        # the positive is put in column 0, so every row's target class is 0
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE (Grill et al. 2020, Sec. 3.1, Eq. 2): 2 - 2 cos(p, z), in fp32.

    p: (N, D) online predictions; z: (N, D) target projections (gradient-free). Returns the mean
    over N; it is 0 exactly when every p_i points the same way as z_i.
    """
    with torch.autocast(p.device.type, enabled=False):
        return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


@torch.no_grad()
def momentum_update_(target: nn.Module, online: nn.Module, m: float) -> None:
    """EMA of parameters, target <- m * target + (1 - m) * online (MoCo Eq. 2; BYOL's tau).

    Only parameters move; the target's BatchNorm buffers keep their own statistics, as in MoCo.
    """
    target_params = [p for p in target.parameters()]
    online_params = [p.detach() for p in online.parameters()]
    # one fused kernel instead of a Python loop
    torch._foreach_lerp_(target_params, online_params, 1.0 - m)


# ----- several processes (torch.distributed): exact no-ops in one process -------------------------

def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x concatenated in rank order, without gradient (the official MoCo helper).

    x: (N, ...), the same shape on every rank -> (W N, ...) for W ranks; x itself when W = 1.
    """
    world_size = rank_and_world_size()[1]
    if world_size == 1:
        return x
    gathered = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(gathered, x.contiguous())
    return torch.cat(gathered)


class _GatherWithGrad(torch.autograd.Function):
    """concat_all_gather forward; backward: this rank's slice of the gradient, summed over ranks."""

    @staticmethod
    def forward(ctx, x):
        return concat_all_gather(x)

    @staticmethod
    def backward(ctx, grad):
        rank, world_size = rank_and_world_size()
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce writes in place
        dist.all_reduce(grad)  # every rank's dL_r / d(this rank's rows), summed: gather_with_grad
        return grad.chunk(world_size)[rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """concat_all_gather, (N, ...) -> (W N, ...), whose gradient flows back to the local rows.

    Why the backward sums over ranks: rank r's loss L_r averages over its own anchors, so the
    single-process loss is L = mean_r L_r, and DDP applies the mean over ranks of each rank's
    gradient. Rank r's rows enter every L_r' as candidates, so dL / d(rows of r) is
    (1/W) sum_r' dL_r' / d(rows of r): rank r must backpropagate that sum, and DDP's 1/W does
    the rest. x itself when W = 1 (the usual GatherLayer pattern, e.g. in SimCLR ports).
    """
    return x if rank_and_world_size()[1] == 1 else _GatherWithGrad.apply(x)


# ----- heads and per-"GPU" BatchNorm --------------------------------------------------------------

def mlp(dims, batchnorm: bool = False) -> nn.Sequential:
    """Linear -> [BN] -> ReLU -> ... -> Linear, widths `dims`, e.g. mlp([2048, 2048, 128]).

    MoCo v2 and SimCLR heads have no BN (their official --mlp); BYOL's projector/predictor do.
    """
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += ([nn.BatchNorm1d(dims[i + 1])] if batchnorm else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def mlp_bn(dims) -> nn.Sequential:
    """SimCLR's own projection head (Chen et al. 2020, its code; MoCo v3; lightly's SimCLR head):
    Linear without bias -> BN after every layer, ReLU between, e.g. mlp_bn([512, 512, 128]) =
    Linear(512, 512)-BN-ReLU-Linear(512, 128)-BN. The BN makes the head learn faster in short runs
    (README: the head tables)."""
    layers = []
    for i in range(len(dims) - 1):
        layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1])]
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


HEADS = {"mlp": mlp, "mlp-bn": mlp_bn}  # mlp: the official S3L / MoCo v2 --mlp head, the default


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with training statistics per chunk of the batch (per-GPU BN of the official code).

    Emulates the official code's 4 GPUs x 32 images on one device: x: (N, C, ...), and contiguous
    chunk s of the batch is what GPU s would hold (group_views lays out two views that way; BYOL
    gives each view its own chunks). A batch that does not divide (fine-tuning's last one) is split
    as evenly as possible, never into chunks of one image. The running statistics are chunk 0's,
    as DDP broadcasts rank 0's buffers. Eval mode is plain BatchNorm; state_dict keys are BN's.
    """

    def __init__(self, num_features: int, num_splits: int, folded: bool = False, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits, self.folded = num_splits, folded

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SplitBatchNorm expects (N, C, ...), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = min(self.num_splits, x.shape[0] // 2)  # BN needs two images a chunk in training
        if not self.training or g <= 1:
            return super().forward(x)
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # a cumulative average, as BatchNorm's, on the device (no .item())
            self._cumulative_running_stats(x.tensor_split(g)[0])
            momentum = 0.0  # batch_norm below leaves the running statistics as they are now
        if self.folded and x.shape[0] % g == 0:
            return self._folded(x, g, momentum)
        # one native batch_norm per chunk: fused and channels_last-aware, 2-3x faster forward +
        # backward on CPU than the same statistics written with var_mean (measured)
        stats = [(self.running_mean, self.running_var)] + [(None, None)] * (g - 1)
        return torch.cat([F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum,
                                       self.eps) for chunk, (mean, var) in zip(x.tensor_split(g),
                                                                               stats)])

    @torch.no_grad()
    def _cumulative_running_stats(self, chunk: torch.Tensor) -> None:
        """momentum=None: running = running + (chunk's statistics - running) / batches seen."""
        var, mean = torch.var_mean(chunk.float(), dim=[0, *range(2, chunk.dim())], correction=1)
        weight = self.num_batches_tracked.reciprocal()  # a float tensor: 1 / count
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), weight)
        self.running_var.lerp_(var.to(self.running_var.dtype), weight)

    def _folded(self, x: torch.Tensor, g: int, momentum: float) -> torch.Tensor:
        """The same statistics in one batch_norm: the g chunks folded into channels, (N, C, ...)
        -> (N/g, g C, ...), channel block s = chunk s (as the MoCo CIFAR-10 demo's SplitBatchNorm,
        there with interleaved chunks): one kernel a layer instead of g, for the GPU."""
        n, c, rest = x.shape[0] // g, x.shape[1], x.shape[2:]
        nhwc = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and \
            not x.is_contiguous()
        if nhwc:  # NHWC in, NHWC out: no view can fold it, so one copy each way, into NHWC
            h, w = rest
            folded = x.view(g, n, c, h, w).permute(1, 3, 4, 0, 2).reshape(n, h, w, g * c)
            folded = folded.permute(0, 3, 1, 2)  # (n, g C, h, w), channels_last
        else:
            folded = x.reshape(g, n, c, *rest).transpose(0, 1).reshape(n, g * c, *rest)
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)  # updated in place
        y = F.batch_norm(folded, mean, var, self.weight.repeat(g), self.bias.repeat(g), True,
                         momentum, self.eps)
        with torch.no_grad():  # chunk 0's running statistics, as the chunked form keeps
            self.running_mean.copy_(mean[:c])
            self.running_var.copy_(var[:c])
        if nhwc:  # (n, h, w, g, c) in memory -> (g, n, h, w, c): chunk s's rows, NHWC again
            y = y.permute(0, 2, 3, 1).reshape(n, h, w, g, c).permute(3, 0, 1, 2, 4)
            return y.reshape(g * n, h, w, c).permute(0, 3, 1, 2)
        return y.reshape(n, g, c, *rest).transpose(0, 1).reshape(x.shape)


def group_views(view1: torch.Tensor, view2: torch.Tensor, groups: int) -> torch.Tensor:
    """Both views in one batch for one encoder pass, laid out for SplitBatchNorm's chunks.

    view1, view2: (N, ...) -> (2N, ...) = [view1 chunk 0, view2 chunk 0, view1 chunk 1, ...]: BN
    chunk s holds both views of the images of chunk s, as the official code's GPU s does.
    """
    return torch.cat([v for pair in zip(view1.chunk(groups), view2.chunk(groups)) for v in pair])


def ungroup_views(z: torch.Tensor, groups: int):
    """The inverse of group_views on the outputs: z (2N, D) -> z1 (N, D), z2 (N, D)."""
    z = z.view(groups, 2, -1, *z.shape[1:])
    return z[:, 0].flatten(0, 1), z[:, 1].flatten(0, 1)


def fold_split_batchnorm_(module: nn.Module, folded: bool) -> nn.Module:
    """Every SplitBatchNorm of `module` in one kernel a layer (folded, the GPU's choice) or one a
    chunk (the CPU's, measured faster there); the same statistics and gradients either way."""
    for m in module.modules():
        if isinstance(m, SplitBatchNorm):
            m.folded = folded
    return module


def split_batchnorm_(module: nn.Module, num_splits: int) -> nn.Module:
    """Swap every BatchNorm1d/2d inside `module` for a SplitBatchNorm with the same state."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            split = SplitBatchNorm(child.num_features, num_splits, eps=child.eps,
                                   momentum=child.momentum)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device))
        else:
            split_batchnorm_(child, num_splits)
    return module


# ----- SimCLR (Chen et al. 2020) ------------------------------------------------------------------

class SimCLR(nn.Module):
    """SimCLR (Chen et al. 2020, Sec. 2.1): one encoder + MLP head, NT-Xent over both views.

    encoder: a ResNet whose `fc` becomes the head: "mlp" Linear(d, d)-ReLU-Linear(d, dim), the
    official S3L --mlp head, or "mlp-bn" (mlp_bn), SimCLR's own. forward(view1, view2): (N, 3, H, W)
    each -> (scalar loss, outputs for health); both views go through one pass, as the official code
    concatenates them.
    Deviations from the official code: negatives come from the whole batch (2N - 2), not per GPU,
    and are gathered from every process when there are several (gather_negatives=False keeps the
    official per-GPU negatives there). The loss is multiplied by c = temperature / base_temperature
    as its SupCon implementation does (x1.43 at T = 0.1; base_temperature = temperature disables
    it): under SGD with weight decay wd that is the lr times c with the weight decay wd / c, not an
    lr scale alone.
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, temperature: float = 0.1,
                 base_temperature: float = 0.07, bn_splits: int = 1, gather_negatives: bool = True,
                 head: str = "mlp"):
        super().__init__()
        d = encoder.feature_dim
        encoder.fc = HEADS[head]([d, d, dim])
        self.encoder = split_batchnorm_(encoder, bn_splits)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.bn_splits, self.gather_negatives = bn_splits, gather_negatives

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        x = group_views(view1, view2, self.bn_splits)  # (2N, 3, H, W): one pass
        h = self.encoder.forward_features(x)  # (2N, d)
        z1, z2 = ungroup_views(self.encoder.fc(h), self.bn_splits)  # (N, dim) each
        outputs = dict(features=ungroup_views(h, self.bn_splits)[0].detach(),
                       z1=z1.detach(), z2=z2.detach())
        rank, world_size = rank_and_world_size()
        if self.gather_negatives and world_size > 1:
            # every rank's rows as candidates, gradients back to ours: with DDP's mean over ranks
            # this is the single-process gradient of the concatenated batch (see gather_with_grad);
            # gathered in fp32, the loss's precision, so the gradients are summed in fp32 too
            z1_all, z2_all = gather_with_grad(z1.float()), gather_with_grad(z2.float())  # (M, dim)
            loss = nt_xent_gathered(z1, z2, self.temperature, z1_all, z2_all, rank)
        else:
            loss = nt_xent(z1, z2, self.temperature)
        return loss * (self.temperature / self.base_temperature), outputs


# ----- MoCo v2 (He et al. 2020; Chen et al. 2020b) ------------------------------------------------

class MoCo(nn.Module):
    """MoCo v2 (He et al. 2020, Algorithm 1; Chen et al. 2020b): momentum key encoder and queue.

    encoder: a ResNet whose `fc` becomes the head (HEADS: "mlp" Linear(d, d)-ReLU-Linear(d, dim),
    the MoCo v2 head, or "mlp-bn", MoCo v3's); encoder_k is its EMA copy. queue: (dim, moco_k)
    normalised keys, a FIFO ring. forward(view1, view2): (N, 3, H, W) each -> (scalar loss,
    outputs), with view1 as queries and view2 as keys. bn_splits > 1 emulates
    per-GPU shuffle-BN on one device. With several processes, shuffle-BN spans every rank and the
    keys of all ranks are enqueued (official _batch_shuffle_ddp, concat_all_gather), so every
    queue is the same; encoder_k needs no communication: DDP keeps encoder_q, hence its EMA, equal.
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, moco_k: int = 4096,
                 moco_m: float = 0.999, moco_t: float = 0.2, bn_splits: int = 1,
                 head: str = "mlp"):
        super().__init__()
        d = encoder.feature_dim
        encoder.fc = HEADS[head]([d, d, dim])
        self.encoder_q = split_batchnorm_(encoder, bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.moco_m, self.moco_t, self.bn_splits = moco_m, moco_t, bn_splits
        self.register_buffer("queue", F.normalize(torch.randn(dim, moco_k), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> nn.Module:
        return self.encoder_q

    @torch.no_grad()
    def _keys(self, view2: torch.Tensor) -> torch.Tensor:
        """Keys (N, dim) of this rank's view2 (N, 3, H, W), in query order, with shuffle-BN."""
        rank, world_size = rank_and_world_size()
        if world_size * self.bn_splits == 1:
            return self.encoder_k(view2)  # one BN group: nothing to shuffle
        # shuffle-BN: keys are shuffled over the global batch before the per-rank, per-chunk BN so
        # a group's statistics cannot leak which key is whose positive (query and key groups
        # differ), then put back in query order; the official _batch_shuffle_ddp and unshuffle
        x = concat_all_gather(view2)  # (W N, 3, H, W)
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        if world_size > 1:
            dist.broadcast(idx_shuffle, src=0)  # one permutation for every rank
        k = self.encoder_k(x[idx_shuffle.view(world_size, -1)[rank]])  # (N, dim): our share
        idx_unshuffle = torch.argsort(idx_shuffle)
        return concat_all_gather(k)[idx_unshuffle.view(world_size, -1)[rank]]  # (N, dim)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        k = concat_all_gather(k)  # (W N, dim): every rank enqueues the global batch in rank order
        n = k.shape[0]
        if self.queue.shape[1] % n:  # a whole number of batches, as the official code asserts
            raise ValueError(f"moco_k = {self.queue.shape[1]} is not divisible by the global batch "
                             f"{n} (images per process x processes); choose a multiple of {n}")
        # indices computed on the device, so the step needs no host sync to read queue_ptr
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % self.queue.shape[1]
        self.queue.index_copy_(1, idx, F.normalize(k.float(), dim=1).T)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue.shape[1])

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        h = self.encoder_q.forward_features(view1)  # (N, d)
        q = self.encoder_q.fc(h)  # (N, dim)
        momentum_update_(self.encoder_k, self.encoder_q, self.moco_m)  # before the keys, as in MoCo
        k = self._keys(view2)  # (N, dim), no gradient
        outputs = dict(features=h.detach(), z1=q.detach(), z2=k)
        loss = info_nce(q, k, self.queue.clone(), self.moco_t)  # clone: the enqueue writes in place
        self._dequeue_and_enqueue(k)
        return loss, outputs


# ----- BYOL (Grill et al. 2020) -------------------------------------------------------------------

class BYOL(nn.Module):
    """BYOL (Grill et al. 2020, Sec. 3.1): online network + predictor, EMA target, no negatives.

    encoder: a ResNet whose `fc` becomes the projector Linear(d, hidden)-BN-ReLU-Linear(hidden,
    dim); the predictor is Linear(dim, hidden)-BN-ReLU-Linear(hidden, dim) (the official S3L
    script: 4096 / 128, tau 0.99 constant). forward(view1, view2): (N, 3, H, W) each ->
    (symmetrised loss in [0, 8], outputs). The target moves by EMA at the start of each forward,
    which equals the official update after each optimizer step. BN sees one view of one GPU's
    images at a time, as the
    official builder runs each view separately: 2 x bn_splits groups over cat([view1, view2]).
    predictor=False: the ablation of BYOL's Table 5b, which collapses (README, health).
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, hidden_dim: int = 4096,
                 tau: float = 0.99, bn_splits: int = 1, predictor: bool = True):
        super().__init__()
        encoder.fc = mlp([encoder.feature_dim, hidden_dim, dim], batchnorm=True)
        # BN group s < bn_splits is view 1's chunk s, group bn_splits + s view 2's chunk s
        self.online = split_batchnorm_(encoder, 2 * bn_splits)
        self.predictor = split_batchnorm_(mlp([dim, hidden_dim, dim], batchnorm=True),
                                          2 * bn_splits) if predictor else nn.Identity()
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.tau, self.bn_splits = tau, bn_splits

    @property
    def backbone(self) -> nn.Module:
        return self.online

    def forward(self, view1: torch.Tensor, view2: torch.Tensor):
        momentum_update_(self.target, self.online, self.tau)
        # one pass per network, with per-view BN groups: the same statistics as a pass per view;
        # the running statistics move once a step (view 1's chunk 0), not once per view
        views = torch.cat([view1, view2])  # (2N, 3, H, W)
        h = self.online.forward_features(views)  # (2N, d)
        z = self.online.fc(h)  # (2N, dim): the online projections
        p1, p2 = self.predictor(z).chunk(2)  # (N, dim) each
        outputs = dict(features=h.chunk(2)[0].detach(), z1=z.chunk(2)[0].detach(),
                       z2=z.chunk(2)[1].detach())
        with torch.no_grad():
            z1, z2 = self.target(views).chunk(2)
        return byol_loss(p1, z2) + byol_loss(p2, z1), outputs  # view 1 predicts view 2, and back


METHODS = {"moco": MoCo, "simclr": SimCLR, "byol": BYOL}  # MoCo v2: the paper's main method


# ----- evaluation: weighted kNN (Wu et al. 2018) --------------------------------------------------

@torch.no_grad()
def knn_neighbours(train_feats: torch.Tensor, test_feats: torch.Tensor, k: int):
    """The k nearest train features of each test feature, nearest first: (cos (M, k), index (M, k)).
    train_feats: (N, D), test_feats: (M, D), both L2-normalised."""
    return (test_feats @ train_feats.T).topk(min(k, train_feats.shape[0]), dim=1)


def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 200,
             t: float = 0.1) -> float:
    """Weighted kNN top-1 in % (Wu et al. 2018, InstDisc; the kNN monitor of the SSL libraries).

    train_feats: (N, D), test_feats: (M, D), both L2-normalised; labels (N,), (M,). Each of the k
    nearest train features votes for its class with weight exp(cos / t), computed as
    exp((cos - cos_max) / t): the same vote up to a factor per query, finite at any t (exp(1 / t)
    alone overflows float32 below t = 0.0113, and argmax would then pick class 0).
    """
    k = min(k, train_feats.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test_feats.shape[0], 1024):  # (1024, N) similarity blocks bound memory
        sim, idx = knn_neighbours(train_feats, test_feats[start:start + 1024], k)  # (B, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        weights = ((sim - sim[:, :1]) / t).exp()  # topk is sorted: column 0 is each row's max
        votes.scatter_add_(1, train_labels[idx], weights)  # (B, classes)
        correct += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return 100.0 * correct / test_feats.shape[0]


# ----- the S3L recipe: small architecture, mixup --------------------------------------------------

def freeze_all_but_conv5(model: nn.Module) -> list:
    """S3L small architecture, conv5 warm-up: only `layer4` and `fc` keep requires_grad.

    Returns the names of the parameters left trainable.
    """
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layer4.", "fc.")))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """mixup (Zhang et al. 2018) as the S3L fine-tuning code does it: one lambda a batch.

    x: (B, 3, H, W) normalised images; y: (B,) labels. lambda ~ Beta(alpha, alpha) and a permutation
    that pairs the images come from torch's global RNG (seeded per epoch by the training loop).
    Returns (lam * x + (1 - lam) * x[perm], y, y[perm], lam); mixup_loss mixes with the same lam.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())  # drawn on the CPU: no device sync
    perm = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[perm], y, y[perm], lam


def mixup_loss(logits: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor,
               lam: float) -> torch.Tensor:
    """lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b); logits: (B, classes), y_a, y_b: (B,)."""
    return lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)


def classifier_loss(model, x: torch.Tensor, y: torch.Tensor, mixup_alpha: float = None):
    """The fine-tuning loss: cross-entropy of model(x), in fp32, against labels y: (B,); with
    mixup_alpha, mixup with one lambda per batch (the S3L fine-tuning code's mixup)."""
    if mixup_alpha is None:
        return F.cross_entropy(model(x).float(), y)
    x, y_a, y_b, lam = mixup(x, y, mixup_alpha)
    return mixup_loss(model(x).float(), y_a, y_b, lam)


# ----- the S3L recipe: the official learning-rate schedules ---------------------------------------

def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every parameter group, as lr_at gives it for the step."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # a CUDA graph reads it from its place (--cuda-graphs)
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def lr_at(epoch: float, epochs: int, base_lr: float, warmup_epochs: float = 0.0, steps=None,
          warmup_from: float = 0.01) -> float:
    """Linear warm-up from `warmup_from`, then cosine to 0, base_lr (1 + cos(pi t)) / 2; or, with
    `steps`, base_lr x 0.1 at each of those epochs (the official --step-lr).

    epoch: whole for the official per-epoch cosine of pretraining, fractional for the per-iteration
    cosine of fine-tuning and for the warm-up.
    """
    if steps:
        return base_lr * 0.1 ** sum(epoch >= s for s in steps)
    if epoch < warmup_epochs:
        return warmup_from + (base_lr - warmup_from) * epoch / warmup_epochs
    t = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


# ----- the paper's settings: the official code's defaults, and what a step costs ----------------


# The official S3L code's settings on CUB-200 (paper map: MoCo v2, SimCLR, BYOL). A pretraining
# flag left unset takes its method's value; the resolved config is printed and saved as config.json.
# lr: SGD (momentum 0.9) for the method's batch, no linear scaling; warm-up epochs apply only above
# WARMUP_MIN_BATCH images a batch; schedules are the official per-epoch cosine.
METHOD_DEFAULTS = {
    "moco": dict(lr=0.03, weight_decay=1e-4,  # the official moco_cub.sh, for batch 128
                 batch_size=128, bn_batch=32,  # 4 GPUs x 32 images: per-GPU BN (shuffle-BN)
                 epochs=200, warmup_epochs=0,  # the paper's CUB pretraining, no warm-up
                 moco_k=4096,  # queue length K, 32 batches (the ImageNet default 65536 is > CUB)
                 moco_m=0.999,  # key-encoder momentum: MoCo's default
                 moco_t=0.2),  # softmax temperature of MoCo v2 (v1: 0.07)
    "simclr": dict(lr=0.5, weight_decay=1e-4,  # SGD, not LARS, for batch 512
                   batch_size=512, bn_batch=128,  # 4 GPUs x 128 images
                   epochs=200, warmup_epochs=10,  # linear from lr 0.01, per iteration
                   simclr_t=0.1,  # NT-Xent temperature of the official script (SimCLR's: 0.5)
                   simclr_base_t=0.07),  # the SupCon code's loss x T / 0.07 (x1.43 at T 0.1)
    "byol": dict(lr=0.125, weight_decay=1e-4,  # for batch 128
                 batch_size=128, bn_batch=32,  # 4 GPUs x 32 images, BN per view
                 epochs=800, warmup_epochs=10,  # warm-up as SimCLR's rule: only above 256 a batch
                 byol_tau=0.99,  # target EMA, constant (no cosine ramp to 1)
                 byol_hidden_dim=4096,  # projector/predictor hidden width (output: --dim 128)
                 byol_predictor=True),  # False: BYOL's Table 5b ablation, a collapse
}
WARMUP_MIN_BATCH = 256  # images: the official code warms up only when the batch exceeds this

# Supervised stages (paper map: fine-tuning, conv5 warm-up, linear probe on target datasets).
# lr_steps: x0.1 at these epochs; None: cosine per iteration. SGD with momentum 0.9.
STAGE_DEFAULTS = {
    "finetune": dict(epochs=120, batch_size=64,  # the S3L recipe on CUB (main_train_mixup.sh)
                     lr=0.1, weight_decay=5e-4,  # for batch 64
                     random_resized_crop=False,  # Resize(256) -> RandomCrop(224) + flip
                     lr_steps=None,  # cosine per iteration, no warm-up
                     input_size=224),  # px: fine-tuning is at full resolution
    "warmup-conv5": dict(epochs=10, batch_size=64,  # main_freeze.py: conv5 + fc, 10 epochs
                         lr=0.1, weight_decay=5e-4,  # for batch 64
                         random_resized_crop=False,  # as fine-tuning
                         lr_steps=[60, 80],  # past its 10 epochs: lr stays 0.1, as the script
                         mixup=False,  # the official warm-up trains without mixup
                         input_size=224),  # px: the parser default, whatever the pretraining size
    "linear": dict(epochs=30, batch_size=64,  # the official CUB linear script
                   lr=10.0, weight_decay=5e-4,  # lr 10 on unnormalised features (MoCo lincls: 30)
                   random_resized_crop=True,  # RRC(224) + flip, as that script (with --data)
                   lr_steps=[10, 20],  # x0.1 at epochs 10 and 20
                   input_size=224),  # px
}

FINETUNE_BN_BATCH = 16  # images: batch 64 by DataParallel on 4 GPUs, BN per GPU

# Backbone passes per training image, in forward-pass units (a backward costs two forwards): MoCo v2
# trains the query encoder on one view and runs the key encoder on the other (3 + 1); SimCLR trains
# on both views (2 x 3); BYOL trains the online network on both views and runs the target on both
# (2 x 3 + 2); fine-tuning 3; the linear probe runs the frozen backbone forward (its fc is ignored).
# Heads and projectors are not counted: small next to the backbone. FLOPs = 2 x macs() x PASSES.
PASSES = {"moco": 4, "simclr": 6, "byol": 8, "finetune": 3, "linear": 1}
