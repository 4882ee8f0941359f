"""Self-supervised methods and the S3L recipe, in reading order: losses, heads, methods, recipe.

Sources: S3L, Cao & Wu 2021, "Rethinking Self-Supervised Learning: Small is Beautiful" (arXiv
2103.13559), whose official-code settings are collected in PAPER.md; SimCLR (Chen et al. 2020, arXiv
2002.05709); MoCo (He et al. 2020, arXiv 1911.05722) and MoCo v2 (Chen et al. 2020b, arXiv
2003.04297); BYOL (Grill et al. 2020, arXiv 2006.07733); mixup (Zhang et al. 2018, arXiv
1710.09412).

  losses   nt_xent, info_nce, byol_loss, momentum_update_
  heads    mlp, SplitBatchNorm, group_views, ungroup_views, split_batchnorm_
  methods  SimCLR, MoCo, BYOL, METHODS  (each forward(view1, view2) -> loss: one loop trains all)
  eval     knn_top1
  recipe   backbone_state, infer_arch, load_backbone, freeze_all_but_conv5, mixup, mixup_loss
           (small architecture: conv1-4 from SSL, a fresh conv5 warmed up; fine-tuning with mixup)

Encoders are passed in (any module with `fc` and `forward_features`, e.g. models.resnet18()); this
file does no file I/O and no printing.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----- losses -------------------------------------------------------------------------------------

def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss (Chen et al. 2020, Sec. 2.1, Eq. 1).

    z1, z2: (N, D) projections of two views; row i of each comes from the same image.
    Each of the 2N rows is an anchor with one positive (its other view) and 2N - 2 negatives.
    Returns the mean over the 2N anchors. Inputs are L2-normalised here, not by the caller.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # (2N, D)
    sim = z @ z.T / temperature  # (2N, 2N)
    # an anchor is never its own negative: -inf on the diagonal drops it from the denominator
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    # row i < N has its positive at column i + N, row i >= N at column i - N
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim.float(), targets)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE loss (He et al. 2020, Eq. 1 and Algorithm 1).

    q: (N, D) queries; k: (N, D) their positive keys (gradient-free); queue: (D, K) negative keys,
    already L2-normalised. q and k are L2-normalised here. Returns the mean (1 + K)-way CE.
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    l_neg = q @ queue.to(q.dtype)  # (N, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (N, 1 + K)
    # the positive is put in column 0, so every row's target class is 0
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits.float(), labels)


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE (Grill et al. 2020, Sec. 3.1, Eq. 2): 2 - 2 cos(p, z).

    p: (N, D) online predictions; z: (N, D) target projections (gradient-free). Returns the mean
    over N; it is 0 exactly when every p_i points the same way as z_i.
    """
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


# ----- heads and per-"GPU" BatchNorm --------------------------------------------------------------

def mlp(dims, batchnorm: bool = False) -> nn.Sequential:
    """Linear -> [BN] -> ReLU -> ... -> Linear, widths `dims`, e.g. mlp([2048, 2048, 128]).

    MoCo v2 and SimCLR heads have no BN (PAPER.md §3.2, §3.4); BYOL's projector/predictor do.
    """
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers += ([nn.BatchNorm1d(dims[i + 1])] if batchnorm else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with training statistics per chunk of the batch (per-GPU BN, PAPER.md §9.5).

    Emulates the official code's 4 GPUs x 32 images on one device: x: (N, C, ...), N divisible by
    num_splits, and contiguous chunk s of the batch is what GPU s would hold (group_views lays out
    two views that way). The running statistics are chunk 0's, as DDP broadcasts rank 0's buffers.
    Eval mode is plain BatchNorm; the state_dict keys are BatchNorm's.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"SplitBatchNorm expects (N, C, ...), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        assert x.shape[0] % g == 0, f"batch of {x.shape[0]} does not split into {g} BN groups"
        self.num_batches_tracked.add_(1)
        momentum = 1 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        # one native batch_norm per chunk: fused and channels_last-aware, 2-3x faster forward +
        # backward on CPU than the same statistics written with var_mean (measured)
        stats = [(self.running_mean, self.running_var)] + [(None, None)] * (g - 1)
        return torch.cat([F.batch_norm(chunk, mean, var, self.weight, self.bias, True, momentum,
                                       self.eps) for chunk, (mean, var) in zip(x.chunk(g), stats)])


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

    encoder: a ResNet whose `fc` becomes the head Linear(d, d)-ReLU-Linear(d, dim) (PAPER.md §3.4).
    forward(view1, view2): (N, 3, H, W) each -> scalar loss. Deviations from the official code:
    negatives come from the whole batch (2N - 2), not per GPU; the loss is scaled by temperature /
    base_temperature as its SupCon implementation does (x1.43 at T = 0.1; base_temperature =
    temperature disables it).
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, temperature: float = 0.1,
                 base_temperature: float = 0.07, bn_splits: int = 1):
        super().__init__()
        d = encoder.feature_dim
        encoder.fc = mlp([d, d, dim])
        self.encoder = split_batchnorm_(encoder, bn_splits)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.bn_splits = bn_splits

    @property
    def backbone(self) -> nn.Module:
        return self.encoder

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        x = group_views(view1, view2, self.bn_splits)  # (2N, 3, H, W): one pass
        z1, z2 = ungroup_views(self.encoder(x), self.bn_splits)  # (N, dim) each
        return nt_xent(z1, z2, self.temperature) * (self.temperature / self.base_temperature)


# ----- MoCo v2 (He et al. 2020; Chen et al. 2020b) ------------------------------------------------

class MoCo(nn.Module):
    """MoCo v2 (He et al. 2020, Algorithm 1; Chen et al. 2020b): momentum key encoder and queue.

    encoder: a ResNet whose `fc` becomes the MLP head Linear(d, d)-ReLU-Linear(d, dim); encoder_k is
    its EMA copy. queue: (dim, moco_k) normalised keys, a FIFO ring. forward(view1, view2): (N, 3,
    H, W) each -> scalar loss, with view1 as queries and view2 as keys. bn_splits > 1 emulates
    shuffle-BN (PAPER.md §9.5).
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, moco_k: int = 4096,
                 moco_m: float = 0.999, moco_t: float = 0.2, bn_splits: int = 1):
        super().__init__()
        d = encoder.feature_dim
        encoder.fc = mlp([d, d, dim])
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
        if self.bn_splits == 1:
            return self.encoder_k(view2)
        # shuffle-BN: keys are shuffled before the grouped BN so a group's statistics cannot leak
        # which key is whose positive (query and key groups differ), then put back in query order
        idx_shuffle = torch.randperm(view2.shape[0], device=view2.device)
        k = self.encoder_k(view2[idx_shuffle])
        return k[torch.argsort(idx_shuffle)]

    @torch.no_grad()
    def _dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        n = k.shape[0]
        # indices computed on the device, so the step needs no host sync to read queue_ptr
        idx = (self.queue_ptr + torch.arange(n, device=k.device)) % self.queue.shape[1]
        self.queue.index_copy_(1, idx, F.normalize(k.float(), dim=1).T)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue.shape[1])

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        q = self.encoder_q(view1)  # (N, dim)
        momentum_update_(self.encoder_k, self.encoder_q, self.moco_m)  # before the keys, as in MoCo
        k = self._keys(view2)  # (N, dim), no gradient
        loss = info_nce(q, k, self.queue.clone(), self.moco_t)  # clone: the enqueue writes in place
        self._dequeue_and_enqueue(k)
        return loss


# ----- BYOL (Grill et al. 2020) -------------------------------------------------------------------

class BYOL(nn.Module):
    """BYOL (Grill et al. 2020, Sec. 3.1): online network + predictor, EMA target, no negatives.

    encoder: a ResNet whose `fc` becomes the projector Linear(d, hidden)-BN-ReLU-Linear(hidden,
    dim); the predictor is Linear(dim, hidden)-BN-ReLU-Linear(hidden, dim) (PAPER.md §3.5: 4096 /
    128, tau 0.99 constant). forward(view1, view2): (N, 3, H, W) each -> symmetrised loss in [0, 8].
    The target moves by EMA at the start of each forward, which equals the official update after
    each optimizer step.
    """

    def __init__(self, encoder: nn.Module, dim: int = 128, hidden_dim: int = 4096,
                 tau: float = 0.99, bn_splits: int = 1):
        super().__init__()
        encoder.fc = mlp([encoder.feature_dim, hidden_dim, dim], batchnorm=True)
        self.online = split_batchnorm_(encoder, bn_splits)
        self.predictor = split_batchnorm_(mlp([dim, hidden_dim, dim], batchnorm=True), bn_splits)
        self.target = copy.deepcopy(self.online).requires_grad_(False)
        self.tau, self.bn_splits = tau, bn_splits

    @property
    def backbone(self) -> nn.Module:
        return self.online

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        momentum_update_(self.target, self.online, self.tau)
        views = group_views(view1, view2, self.bn_splits)  # (2N, 3, H, W): one pass per network
        p1, p2 = ungroup_views(self.predictor(self.online(views)), self.bn_splits)
        with torch.no_grad():
            z1, z2 = ungroup_views(self.target(views), self.bn_splits)
        return byol_loss(p1, z2) + byol_loss(p2, z1)  # view 1 predicts view 2 and vice versa


METHODS = {"moco": MoCo, "simclr": SimCLR, "byol": BYOL}  # MoCo v2: the paper's main method


# ----- evaluation: weighted kNN (Wu et al. 2018) --------------------------------------------------

@torch.no_grad()
def knn_top1(train_feats, train_labels, test_feats, test_labels, k: int = 200,
             t: float = 0.1) -> float:
    """Weighted kNN top-1 in % (Wu et al. 2018, InstDisc; the kNN monitor of the SSL libraries).

    train_feats: (N, D), test_feats: (M, D), both L2-normalised; labels (N,), (M,). Each of the k
    nearest train features votes for its class with weight exp(cos / t).
    """
    k = min(k, train_feats.shape[0])
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, test_feats.shape[0], 1024):  # (1024, N) similarity blocks bound memory
        sim, idx = (test_feats[start:start + 1024] @ train_feats.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / t).exp())  # (B, classes)
        correct += (votes.argmax(1) == test_labels[start:start + 1024]).sum().item()
    return 100.0 * correct / test_feats.shape[0]


# ----- the S3L recipe: moving backbones between stages --------------------------------------------

# prefixes under which a backbone sits in this project's methods and in the official S3L/MoCo/BYOL
# checkpoints (PAPER.md §8); the first that matches is stripped
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


def infer_arch(state: dict):
    """(arch, conv5, small_stem) of a backbone state_dict, read off its keys and shapes."""
    arch = "resnet50" if "layer1.0.conv3.weight" in state else \
        "resnet34" if "layer3.5.conv1.weight" in state else "resnet18"
    return arch, any(k.startswith("layer4.") for k in state), state["conv1.weight"].shape[-1] == 3


def load_backbone(model: nn.Module, state: dict, allow_missing=("fc.",)) -> list:
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


def freeze_all_but_conv5(model: nn.Module) -> list:
    """Small architecture, conv5 warm-up (PAPER.md §1.3): only `layer4` and `fc` keep requires_grad.

    Returns the names of the parameters left trainable.
    """
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(("layer4.", "fc.")))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """mixup (Zhang et al. 2018) as the S3L fine-tuning code (PAPER.md §3.8): one lambda a batch.

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
