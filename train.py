"""The s3l command line: every stage of S3L (Cao & Wu 2021, arXiv 2103.13559), one subcommand each.

  python train.py                      the default job: S3L on the built-in shapes, kNN vs untrained
  python train.py pretrain --data DIR  MoCo v2, SimCLR or BYOL at small resolution
  python train.py warmup-conv5 ...     small architecture: fresh conv5 on frozen SSL conv1-4
  python train.py finetune ...         the whole network with mixup, 224 px by default
  python train.py linear | knn ...     evaluations of frozen features
  python train.py export CKPT OUT.pt   the backbone as a plain state_dict with torchvision names
  python study.py --data DIR           the paper's comparisons: grids of the above (study.py)
  torchrun --nproc_per_node N train.py pretrain ...   any training command on N GPUs (DDP)

README.md's "Paper map" says which paper section and official script each stage reproduces, its
"Reading order" which functions one step runs through. Here, in order: data and the architecture
from the flags, a run's bookkeeping (runs.Run), kNN, one training step (pretrain_step,
supervised_step: what bench.py times), the pretraining loop, the supervised loop, the default job,
main. The paper's maths lives in s3l.py (losses, methods, the recipe and its defaults), models.py
and augment.py; the flags in cli.py; the machinery around a run in data.py, runs.py (the run
folder), checkpoints.py and devices.py (device, precision, torchrun, CUDA graphs).
"""
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

import augment
import checkpoints
import cli
import data
import devices
import health
import models
import pictures
import runs
import s3l


# ----- data, from the flags (the device: cli.runtime_for) ----------------------------------------

def store_args(args, runtime: devices.Runtime) -> dict:
    """data.load_store's settings from the flags: --store-size (small resolution, paper map), the
    cache, the training device; under torchrun a node's first process decodes a split, the others
    then read its cache."""
    return dict(store_size=args.store_size, cache_dir=args.cache_dir, workers=args.workers,
                cache_max_gb=args.cache_max_gb, device=runtime.device,
                processes=runtime.local_world_size, around_decode=runtime.local_rank_0_first)


def train_split_args(args, runtime: devices.Runtime) -> dict:
    """data.load_train_store's settings: store_args and the --subset of small data (paper map),
    seeded by --seed, recorded in --save-dir by rank 0."""
    return dict(store_args(args, runtime), subset=args.subset, seed=args.seed,
                save_dir=args.save_dir, writes=runtime.is_main)


# ----- the architecture: resolved once from the flags and the checkpoint --------------------------

@dataclass(frozen=True)
class Architecture:
    """The ResNet a stage builds. conv5=False is S3L's small architecture (no layer4)."""
    arch: str
    conv5: bool
    small_stem: bool
    input_size: int

    def build(self, num_classes: int = 0) -> models.ResNet:
        return models.ARCHS[self.arch](num_classes, conv5=self.conv5, small_stem=self.small_stem)


def resolve_architecture(args, state=None, input_size=None) -> Architecture:
    """--arch, --small-stem, --conv5 and --input-size (unset: `input_size`, else 224). Without a
    backbone state_dict `state`: the flags, else the paper's ResNet-50. With one: its architecture
    (a flag that contradicts it exits), conv5 as the checkpoint's unless --conv5/--no-conv5."""
    size = args.input_size or input_size or 224
    if state is None:
        return Architecture(args.arch or "resnet50", args.conv5 is not False,
                            bool(args.small_stem), size)
    arch, conv5, small_stem = checkpoints.infer_arch(state)
    if (args.arch or arch) != arch or args.small_stem not in (None, small_stem):
        asked = f"--arch {args.arch or arch}" + ("" if args.small_stem is None else
                                                 f" --{'' if args.small_stem else 'no-'}small-stem")
        raise SystemExit(f"the checkpoint holds a {arch} backbone (small_stem={small_stem}, "
                         f"conv5={conv5}), but {asked} was asked: drop the flag or pass a matching "
                         "checkpoint")
    return Architecture(arch, conv5 if args.conv5 is None else args.conv5, small_stem, size)


# ----- a run: its log, its bookkeeping (runs.Run), its summary -----------------------------------

def due(epoch: int, epochs: int, every: int) -> bool:
    """Whether an evaluation follows epoch `epoch` (from 0), pretraining's kNN monitor or a
    supervised stage's test top-1 (paper map): every `every` epochs (0: none) and after the last."""
    return epoch + 1 == epochs or bool(every) and (epoch + 1) % every == 0


def run_log(args, runtime: devices.Runtime, architecture: Architecture, resumed=None,
            run_id: str = None, classes: int = 0) -> runs.RunLog:
    """The run folder of this command, its config.json holding every resolved setting and the
    run's id (runs.claim_run_folder: a resume continues only the run of its checkpoint).
    classes: a classifier's, whose loss at chance is ln(classes)."""
    config = dict(vars(args), architecture=asdict(architecture), runtime=runtime.reason,
                  world_size=runtime.world_size, run_id=run_id)
    return runs.RunLog(args.save_dir, config, resumed["epoch"] if resumed else None,
                       writes=runtime.is_main, stop_diverging=args.command != "pretrain",
                       chance=math.log(classes) if classes > 1 else None)


def open_run(args, runtime, *, architecture: Architecture, model, params, resumed, train_store,
             stages: list, steps: int, stage: dict, results: dict = None) -> runs.Run:
    """The bookkeeping of a training loop (runs.Run) from the flags: the run log, SGD on `params`
    with the gradient scaler, restored from `resumed` once checkpoints.check_resume finds it this
    run's. stage: this stage's record for cost accounting (epochs, macs_per_image, ...)."""
    if resumed:
        checkpoints.check_resume(args.resume, resumed, vars(args), train_store.paths,
                          world_size=runtime.world_size, force=args.force_resume)
    optimizer = runtime.sgd(params, args.lr, args.momentum, args.weight_decay)
    state = checkpoints.TrainState(model, optimizer, runtime.scaler())
    run_id = (resumed or {}).get("run_id") or runs.new_run_id()
    fields = dict(kind=args.command, config=vars(args), architecture=asdict(architecture),
                  train_files=checkpoints.files_digest(train_store.paths), run_id=run_id)
    causes = f"lower --lr (now {args.lr:g}) or --weight-decay (now {args.weight_decay:g}); " \
        f"--batch-size {args.batch_size}; {runtime.precision_cause()}"
    # a fine-tuning far above chance in epoch 1 diverged; the probe's lr 10 on raw features is
    # far above it by design and still converges (README)
    classes = len(train_store.classes) if args.command in ("finetune", "warmup-conv5") else 0
    return runs.Run(runtime, state, run_log(args, runtime, architecture, resumed, run_id, classes),
                    resumed, save_dir=args.save_dir, save_every=args.save_every, seed=args.seed,
                    epochs=args.epochs, steps=steps, batch_size=args.batch_size, stages=stages,
                    images=len(train_store), print_freq=args.print_freq, fields=fields,
                    stage=dict(command=args.command, **asdict(architecture), **stage),
                    results=results, causes=causes, order_device=train_store.index_device)


def summarize(args, log, runtime, *, architecture: Architecture, stages: list, **results) -> dict:
    """summary.json of a training command: its backbone, results and the pipeline's stages."""
    summary = dict(command=args.command, **asdict(architecture), epochs=args.epochs, **results,
                   wall_s=stages[-1]["wall_s"], device=runtime.reason,
                   checkpoint=os.path.join(args.save_dir, "checkpoint.pt"), stages=stages)
    log.summary(summary)
    return summary


# ----- evaluation: kNN (the features and top-1 of centre views: devices.py) -------------------

def knn_eval(net, bank: data.ImageStore, queries: data.ImageStore, *, input_size: int,
             runtime: devices.Runtime, k: int, t: float, title: str = None):
    """kNN top-1 (%) of the backbone `net`: `bank` is the labelled memory, `queries` are
    classified. Returns (top-1, None), or with a title (top-1, the neighbours' picture panel)."""
    feats = [devices.extract_features(net, s, input_size, runtime) for s in (bank, queries)]
    acc = s3l.knn_top1(feats[0], bank.labels, feats[1], queries.labels, k, t)
    return acc, pictures.neighbours_panel(bank, queries, *feats, f"{title}: kNN {acc:.1f} %")[0] \
        if title else None


# ----- one training step: what the loops run and bench.py times ----------------------------------

def pretrain_views(store: data.ImageStore, idx: torch.Tensor, augmenter: augment.SSLAugment,
                   generator: torch.Generator, runtime: devices.Runtime, apply=None):
    """Two views of the batch `idx` (B,) of all processes, this process's share (n of B), made from
    the uint8 store on the device (augment.SSLAugment; apply: its compiled apply). The parameters
    of the whole batch are drawn, so any number of processes sees the same views.
    Returns view1, view2: (n, 3, input_size, input_size) each, as the model wants them."""
    images, _ = store.batch(runtime.share(idx), runtime.device)  # uint8 (n, 3, L, L)
    params = [runtime.share(augmenter.sample(store.sizes_of(idx), generator)) for _ in range(2)]
    return tuple(runtime.prepare((apply or augmenter.apply)(images, p)) for p in params)


def pretrain_step(model, state: checkpoints.TrainState, runtime: devices.Runtime,
                  view1: torch.Tensor, view2: torch.Tensor):
    """One SSL step, the same for every method: loss, outputs = model(view1, view2) under the
    precision context, backward, SGD. view1, view2: (n, 3, H, W). Returns the loss (not read back)
    and the method's outputs (detached features and projections: the health measures' input)."""
    with runtime.autocast():
        loss, outputs = model(view1, view2)
    return sgd_step(state, loss), outputs


def supervised_step(model, state: checkpoints.TrainState, runtime: devices.Runtime, x: torch.Tensor,
                    y: torch.Tensor, mixup_alpha: float = None) -> torch.Tensor:
    """One step of fine-tuning, the conv5 warm-up or the linear probe: cross-entropy of model(x)
    (mixup with one lambda a batch when mixup_alpha), backward, SGD. x: (n, 3, H, W), y: (n,)."""
    with runtime.autocast():
        loss = s3l.classifier_loss(model, x, y, mixup_alpha)
    return sgd_step(state, loss)


def sgd_step(state: checkpoints.TrainState, loss: torch.Tensor) -> torch.Tensor:
    """Backward and the optimizer step; the gradient scaler does nothing unless fp16."""
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss.detach()


# ----- pretraining: one loop for every method -----------------------------------------------------

def bn_groups(args, processes: int) -> tuple:
    """(groups per process, images per group) of the per-GPU BatchNorm that --bn-batch emulates:
    each process splits its share of the batch into groups of --bn-batch images; 0: one group of
    its share; --sync-bn: one group of the whole batch."""
    per_process = args.batch_size // processes
    if args.sync_bn:
        return 1, args.batch_size
    group = args.bn_batch or per_process
    return per_process // group, group


def build_method(args, encoder, processes: int = 1) -> torch.nn.Module:
    """The method of --method around `encoder`, with the paper's hyperparameters from the resolved
    flags, its BN in the groups of bn_groups (the official per-GPU BN)."""
    bn_splits = bn_groups(args, processes)[0]
    if args.method == "moco":
        return s3l.MoCo(encoder, dim=args.dim, moco_k=args.moco_k, moco_m=args.moco_m,
                        moco_t=args.moco_t, bn_splits=bn_splits, head=args.head)
    if args.method == "simclr":
        return s3l.SimCLR(encoder, dim=args.dim, temperature=args.simclr_t,
                          base_temperature=args.simclr_base_t, bn_splits=bn_splits,
                          gather_negatives=not args.simclr_local_negatives, head=args.head)
    return s3l.BYOL(encoder, dim=args.dim, hidden_dim=args.byol_hidden_dim, tau=args.byol_tau,
                    bn_splits=bn_splits, predictor=args.byol_predictor)


def init_from(method, path: str, architecture: Architecture, method_name: str) -> list:
    """Multi-stage resolution (112 -> 224, paper map): start from an earlier stage's weights. The
    same method loads its whole state (encoders, heads, and the queue when its size matches);
    another method loads the backbone only. Returns the earlier stages, for cost accounting."""
    ckpt = checkpoints.read_checkpoint(path)
    if ckpt.get("format") != "s3l" or ckpt.get("kind") != "pretrain":
        raise SystemExit(f"--init-from {path} is not a pretraining checkpoint of s3l")
    state, old = ckpt["model"], Architecture(**ckpt["architecture"])
    if replace(old, input_size=architecture.input_size) != architecture:
        raise SystemExit(f"--init-from {path} holds {old.arch} conv5={old.conv5} "
                         f"small_stem={old.small_stem}, but this run builds {architecture.arch} "
                         f"conv5={architecture.conv5} small_stem={architecture.small_stem}")
    if ckpt["config"]["method"] == method_name:
        if "queue" in state and state["queue"].shape != method.queue.shape:
            print(f"--init-from: the queue of size {tuple(state['queue'].shape)} dropped")
            state = {k: v for k, v in state.items() if not k.startswith("queue")}
        missing, unexpected = method.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("queue")]:
            raise SystemExit(f"--init-from {path}: missing {missing}, unexpected {unexpected}")
    else:
        checkpoints.load_backbone(method.backbone, checkpoints.backbone_state(state))
        print(f"--init-from: a {ckpt['config']['method']} checkpoint, so the backbone only")
    print(f"initialised from {path} ({old.input_size} px, {len(ckpt['stages'])} earlier stage(s))")
    return ckpt["stages"]


def pretrain(args) -> dict:
    """Self-supervised pretraining, step 1 of the S3L recipe (paper map); returns the summary."""
    resumed = checkpoints.resume_checkpoint(args.resume, args.command, args.method, args.epochs)
    architecture = resolve_architecture(args)  # a resumed run: its config's (check_resume)
    runtime = cli.runtime_for(args)
    train_store = data.load_train_store(args.data, args.train_split, architecture.input_size,
                                        min_crop_scale=args.crop_scale[0],
                                        **train_split_args(args, runtime))
    n = len(train_store)
    cli.check_pretrain_args(args, n, runtime.world_size)
    test_split = args.test_split or data.default_eval_split(args.data)
    bank, queries = data.knn_stores(train_store, args.data, test_split, architecture.input_size,
                                    knn_train=args.knn_train, knn_val=args.knn_val,
                                    **store_args(args, runtime))
    torch.manual_seed(args.seed)
    method = build_method(args, architecture.build(), runtime.world_size)
    method = runtime.place(s3l.fold_split_batchnorm_(method, runtime.fold_bn), args.sync_bn)
    if resumed:  # this stage's own record, last, is written anew
        stages = resumed["stages"][:-1]
    else:
        stages = init_from(method, args.init_from, architecture, args.method) \
            if args.init_from else []
    steps = n // args.batch_size  # drop_last, as the official loaders
    stage = dict(epochs=args.epochs, method=args.method, images=n,
                 images_per_epoch=steps * args.batch_size,
                 macs_per_image=models.macs(architecture.build(), architecture.input_size))
    run = open_run(args, runtime, architecture=architecture, model=method, resumed=resumed,
                   params=[p for p in method.parameters() if p.requires_grad],
                   train_store=train_store, stages=stages, steps=steps, stage=stage)
    augmenter = augment.SSLAugment(architecture.input_size, scale=tuple(args.crop_scale),
                                   solarize_p=args.solarize_p, blur_p=args.blur_p,
                                   resample_dtype=runtime.resample_dtype)
    if runtime.is_main and not os.path.exists(os.path.join(args.save_dir, "views.png")):
        first_views(args, runtime, train_store, augmenter, architecture)
    loop_start = time.time()
    record, knn = train_ssl(args, runtime, run, method=method, train_store=train_store,
                            augmenter=augmenter, knn_sets=(bank, queries),
                            architecture=architecture)
    trained = (args.epochs - run.start["epoch"]) * stage["images_per_epoch"]
    return summarize(args, run.log, runtime, architecture=architecture, stages=run.all_stages(),
                     method=args.method, final_loss=record.get("loss"), knn_top1=knn,
                     macs_per_image=stage["macs_per_image"], train_images=n,
                     images_per_s=round(trained / (time.time() - loop_start), 1),
                     skipped_files=len(train_store.skipped),
                     health={k: v for k, v in record.items() if k in health.KEYS} or None)


def first_views(args, runtime, train_store, augmenter, architecture, k: int = 6):
    """views.png: the first k images of a fresh run's first batch, as stored, and the two views its
    first step receives (the same seeded order and generator state, drawn apart: the run's own
    streams are untouched). Returns the views, (k, 3, S, S) each."""
    generator = torch.Generator(runtime.device)
    order = runs.epoch_order(args.seed, 0, len(train_store), generator,
                             train_store.index_device)  # what the run's epoch 0 draws
    idx = order[:args.batch_size]
    view1, view2 = pretrain_views(train_store, idx, augmenter, generator, runtime)
    images, sizes = train_store.batch(runtime.share(idx)[:k], torch.device("cpu"))
    a = augmenter
    caption = (f"{architecture.input_size} px views, crop area {a.scale[0]:g}-{a.scale[1]:g}, "
               f"jitter p {a.jitter_p:g}, grey p {a.grayscale_p:g}, blur p {a.blur_p:g}, "
               f"solarize p {a.solarize_p:g}, flip p {a.flip_p:g}")
    pictures.draw_views(os.path.join(args.save_dir, "views.png"), images, sizes, view1[:k],
                        view2[:k], caption, a.mean, a.std)
    return view1[:k], view2[:k]


def health_monitor(args, runtime: devices.Runtime, steps: int, group: int):
    """The label-free health measures of this run (health.py), or None with --no-health; its
    collapse warning names the settings of this run that can cause one."""
    if not args.health:
        return None
    scale = args.simclr_t / args.simclr_base_t if args.method == "simclr" else 1.0
    candidates = args.batch_size // (runtime.world_size if args.simclr_local_negatives else 1)
    paper = s3l.METHOD_DEFAULTS[args.method]  # SimCLR's lr 0.5 is for batch 512: say so at 32
    set_for = f", the method's default, set for batch {paper['batch_size']}" if \
        args.lr == paper["lr"] and args.batch_size != paper["batch_size"] else ""
    causes = f"--lr {args.lr:g} (too high or too low{set_for}); " + \
        (f"--byol-tau {args.byol_tau:g} (BYOL: 0.99-0.996); " if args.method == "byol" else "") + \
        f"--batch-size {args.batch_size} in BN groups of {group} (--bn-batch: too small groups " \
        f"leak; BYOL needs BN); {runtime.precision_cause()}"
    return health.HealthMonitor(args.method, health.chance_loss(
        args.method, candidates, args.moco_k, scale), args.print_freq, steps, causes)


def train_ssl(args, runtime, run: runs.Run, *, method, train_store, augmenter, knn_sets,
              architecture: Architecture):
    """The pretraining loop, the same for every method: per step, two views of a batch, then
    loss, outputs = method(view1, view2), backward and SGD (pretrain_step), health every
    --print-freq steps; per epoch, the kNN monitor where labels exist, a log record, a checkpoint
    (run: runs.Run). Returns (the last epoch's record, the last kNN top-1 or None)."""
    model = runtime.wrap(torch.compile(method) if args.compile else method)  # DDP under torchrun
    # --cuda-graphs: the same step, captured once as a CUDA graph and then replayed
    step_fn = devices.GraphedStep(pretrain_step, run.state.optimizer) if args.cuda_graphs else \
        pretrain_step
    apply = torch.compile(augmenter.apply) if args.compile else augmenter.apply  # one fused graph
    group = bn_groups(args, runtime.world_size)[1]
    print(f"pretraining {args.method} {architecture.arch} conv5={architecture.conv5} at "
          f"{architecture.input_size} px on {len(train_store)} images: {run.num_steps} steps an "
          f"epoch, BN groups of {group} images")
    record, knn, monitor = {}, None, health_monitor(args, runtime, run.num_steps, group)
    with run:
        for epoch in run.epochs():
            method.train()
            for step in run.steps():
                # the official cosine is per epoch; the warm-up per iteration
                lr_epoch = epoch + step / run.num_steps if epoch < args.warmup_epochs else epoch
                lr = s3l.lr_at(lr_epoch, args.epochs, args.lr, warmup_epochs=args.warmup_epochs)
                s3l.set_lr(run.state.optimizer, lr)
                view1, view2 = pretrain_views(train_store, run.batch(step), augmenter,
                                              run.generator, runtime, apply)
                loss, outputs = step_fn(model, run.state, runtime, view1, view2)
                run.step_done(step, loss, lr)
                if monitor and monitor.due(step):  # label-free health, on the step's outputs
                    monitor.observe(epoch, step, outputs, loss)
            record = run.epoch_record()
            record.update(monitor.epoch_record(epoch, record["loss"]) if monitor else {})
            if knn_sets[0] is not None and due(epoch, args.epochs, args.knn_every):
                last = epoch + 1 == args.epochs and runtime.is_main  # neighbours.png at the end
                knn, panel = knn_eval(method.backbone, *knn_sets, runtime=runtime, k=args.knn_k,
                                      t=args.knn_t, input_size=architecture.input_size,
                                      title=f"{args.method}, epoch {epoch + 1}" if last else None)
                record["knn_top1"] = round(knn, 2)
                if panel:
                    panel.save(os.path.join(args.save_dir, "neighbours.png"))
            run.save_epoch(record)
            if monitor and runtime.is_main:
                health.draw(args.save_dir)  # health.png from log.jsonl, every epoch
    return record, knn


# ----- supervised stages: fine-tuning, the conv5 warm-up, the linear probe ------------------------

def supervised_setup(args, build_conv5=None):
    """The common start of finetune, warmup-conv5, linear and knn: the --pretrained backbone, the
    device, the labelled splits, a seeded ResNet with one output per class (build_conv5=True: with
    layer4 whatever the checkpoint). Returns (runtime, architecture, train_store, test_store, net,
    the checkpoint's earlier stages)."""
    ckpt, state = checkpoints.read_backbone(args.pretrained)
    ckpt_size = checkpoints.trained_input_size(ckpt, args.pretrained) if ckpt else None
    # kNN, and every stage on the built-in data (no --data), at the checkpoint's size by default
    own_size = args.command == "knn" or args.data is None
    size = ckpt_size if own_size else s3l.STAGE_DEFAULTS[args.command]["input_size"]
    if own_size and ckpt and not ckpt_size and not args.input_size:
        print(f"note: {args.pretrained} does not say the resolution it was trained at, so "
              f"{args.command} runs at 224 px: pass --input-size (e.g. the pretraining's)")
    architecture = resolve_architecture(args, state, input_size=size)
    built = architecture if build_conv5 is None else replace(architecture, conv5=build_conv5)
    runtime = cli.runtime_for(args)
    test_split = args.test_split or data.default_eval_split(args.data)
    train_store, test_store = data.labelled_splits(
        args.data, args.train_split, test_split, built.input_size, command=args.command,
        **train_split_args(args, runtime))
    torch.manual_seed(args.seed)
    net = built.build(num_classes=len(train_store.classes))
    if state is not None:  # backbone.conv5: the checkpoint's conv5 is used
        checkpoints.load_pretrained(net, state, args.pretrained, keep_conv5=architecture.conv5)
    stages = ckpt.get("stages", []) if ckpt else []
    return runtime, built, train_store, test_store, net, stages


def finetune(args) -> dict:
    """Fine-tune the whole network (step 3 of the recipe), or, as `warmup-conv5`, train conv5 + fc
    on frozen SSL conv1-4 (step 2, small architecture). No --pretrained: from scratch."""
    warmup = args.command == "warmup-conv5"
    runtime, architecture, train_store, test_store, net, stages = supervised_setup(
        args, build_conv5=True)
    if args.bn_batch:  # per-GPU BN; a last, smaller batch splits as evenly as possible
        s3l.split_batchnorm_(net, bn_groups(args, runtime.world_size)[0])
        s3l.fold_split_batchnorm_(net, runtime.fold_bn)
    frozen_bn = []
    if warmup:  # fc N(0, 0.01) as the official main_freeze.py; only conv5 and fc learn
        torch.nn.init.normal_(net.fc.weight, std=0.01)
        torch.nn.init.zeros_(net.fc.bias)
        trainable = s3l.freeze_all_but_conv5(net)
        print(f"warm-up trains {len(trainable)} tensors (layer4.*, fc.*); conv1-4 are frozen")
        if args.frozen_bn_eval:
            frozen_bn = [m for name, m in net.named_modules() if not name.startswith("layer4")
                         and isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    net = runtime.place(net, args.sync_bn)
    model = torch.compile(net) if args.compile else net  # checkpoints from `net`: no _orig_mod.
    params = [p for p in net.parameters() if p.requires_grad]
    mixup_alpha = args.mixup_alpha if args.mixup else None
    return train_classifier(args, runtime, architecture=architecture, net=net, model=model,
                            params=params, train_store=train_store, test_store=test_store,
                            stages=stages, frozen_bn=frozen_bn, mixup_alpha=mixup_alpha)


def linear(args) -> dict:
    """Linear probe on frozen features (the official --linear-eval): backbone frozen with BN in eval
    mode, fc N(0, 0.01), SGD lr 10 with x0.1 steps, random crop + flip every epoch. With
    --cached-features: centre-crop features computed once and trained on (fast, not official)."""
    runtime, architecture, train_store, test_store, net, stages = supervised_setup(args)
    torch.nn.init.normal_(net.fc.weight, std=0.01)
    torch.nn.init.zeros_(net.fc.bias)
    net = runtime.place(net.requires_grad_(False))
    net.fc.requires_grad_(True)
    frozen = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    if args.cached_features:
        summary = linear_on_cached_features(args, runtime, architecture=architecture, net=net,
                                            train_store=train_store, test_store=test_store,
                                            stages=stages)
    else:
        summary = train_classifier(args, runtime, architecture=architecture, net=net, model=net,
                                   params=list(net.fc.parameters()), train_store=train_store,
                                   test_store=test_store, stages=stages, frozen_bn=[net],
                                   mixup_alpha=None)
    for key, value in net.state_dict().items():  # MoCo's lincls sanity check
        assert key.startswith("fc.") or torch.equal(value, frozen[key]), f"the probe changed {key}"
    return summary


def train_classifier(args, runtime, *, architecture: Architecture, net, model, params, train_store,
                     test_store, stages: list, frozen_bn: list, mixup_alpha) -> dict:
    """The supervised loop of finetune, warmup-conv5 and the official linear probe: per step, the
    official train view of a batch, cross-entropy (with mixup: one lambda a batch), SGD
    (supervised_step); per epoch, test top-1 of centre views. net: the module checkpointed; model:
    what runs it; params: what SGD trains; frozen_bn: modules kept in eval mode. Reports the final
    top-1 and the best epoch's, labelled as chosen on the test split (the official code's)."""
    resumed = checkpoints.resume_checkpoint(args.resume, args.command, epochs=args.epochs)
    best = resumed["best"] if resumed else dict(test_top1=None, epoch=None)
    acc = resumed["test_top1"] if resumed else None
    n, bs = len(train_store), args.batch_size
    # the last, smaller batch only if each process gets 2 images of it (BatchNorm needs 2)
    steps = n // bs + (n % bs >= 2 * runtime.world_size)
    stage = dict(epochs=args.epochs, images_per_epoch=min(n, steps * bs),
                 macs_per_image=models.macs(architecture.build(), architecture.input_size))
    run = open_run(args, runtime, architecture=architecture, model=net, params=params,
                   resumed=resumed, train_store=train_store, stages=stages, steps=steps,
                   stage=stage, results=dict(best=best, test_top1=acc))
    trained = runtime.wrap(model)  # DDP under torchrun
    with run:
        for epoch in run.epochs():
            net.train()
            for module in frozen_bn:
                module.eval()
            for step in run.steps():
                lr = s3l.lr_at(epoch + step / steps, args.epochs, args.lr, steps=args.lr_steps)
                s3l.set_lr(run.state.optimizer, lr)
                x, y = classifier_batch(train_store, run.batch(step), run.generator, runtime,
                                        architecture.input_size, args.random_resized_crop)
                loss = supervised_step(trained, run.state, runtime, x, y, mixup_alpha)
                run.step_done(step, loss, lr)
            record = run.epoch_record()
            if due(epoch, args.epochs, args.eval_every):
                acc = devices.classify_top1(model, test_store, architecture.input_size, runtime)
                record["test_top1"] = round(acc, 2)
                best = best_top1(best, acc, epoch)
            run.save_epoch(record, best=best, test_top1=acc)
    return finish_supervised(args, run.log, runtime, architecture=architecture, acc=acc, best=best,
                             stages=run.all_stages())


def classifier_batch(train_store: data.ImageStore, idx: torch.Tensor, generator, runtime,
                     input_size: int, random_resized_crop: bool = False):
    """This process's share of the batch `idx` as the official train transform makes it (Resize ->
    RandomCrop, or RandomResizedCrop, + flip; the whole batch's crops drawn, as in pretrain_views).
    Returns (x (n, 3, input_size, input_size) as the model wants it, y (n,))."""
    mine = runtime.share(idx)
    images, _ = train_store.batch(mine, runtime.device)
    crops = augment.finetune_train_params(train_store.sizes_of(idx), input_size, generator,
                                          random_resized_crop)
    x = augment.finetune_train_view(images, runtime.share(crops), input_size,
                                    dtype=runtime.resample_dtype)
    return runtime.prepare(x), train_store.labels_of(mine)


def best_top1(best: dict, acc: float, epoch: int) -> dict:
    """The best test top-1 so far and its epoch (from 1), after `acc` in epoch `epoch` (from 0):
    what the official fine-tuning code reports, logged beside the final-epoch one."""
    if best["test_top1"] is None or acc > best["test_top1"]:
        return dict(test_top1=round(acc, 2), epoch=epoch + 1)
    return best


def linear_on_cached_features(args, runtime, *, architecture: Architecture, net, train_store,
                              test_store, stages: list) -> dict:
    """The fast probe: centre-crop features of both splits computed once, then the fc trained on
    them with the probe's schedule and no augmentation, in a run like the others (runs.Run)."""
    resumed = checkpoints.resume_checkpoint(args.resume, args.command, epochs=args.epochs)
    best = resumed["best"] if resumed else dict(test_top1=None, epoch=None)
    acc = resumed["test_top1"] if resumed else None
    stage = dict(epochs=args.epochs, images_per_epoch=len(train_store), cached_features=True,
                 macs_per_image=models.macs(architecture.build(), architecture.input_size))
    run = open_run(args, runtime, architecture=architecture, model=net, resumed=resumed,
                   params=list(net.fc.parameters()), train_store=train_store, stages=stages,
                   steps=math.ceil(len(train_store) / args.batch_size), stage=stage,
                   results=dict(best=best, test_top1=acc))
    feats = [devices.extract_features(net, s, architecture.input_size, runtime, normalize=False)
             for s in (train_store, test_store)]  # every process: all of them, in order
    with run:
        for epoch in run.epochs():
            lr = s3l.lr_at(epoch, args.epochs, args.lr, steps=args.lr_steps)
            s3l.set_lr(run.state.optimizer, lr)
            for step in run.steps():
                idx = run.batch(step)
                loss = F.cross_entropy(net.fc(feats[0][idx]), train_store.labels_of(idx))
                run.step_done(step, sgd_step(run.state, loss), lr)
            record = run.epoch_record()
            with torch.no_grad():
                predicted = net.fc(feats[1]).argmax(1)
            acc = 100.0 * (predicted == test_store.labels).float().mean().item()
            record["test_top1"], best = round(acc, 2), best_top1(best, acc, epoch)
            run.save_epoch(record, best=best, test_top1=acc)
    return finish_supervised(args, run.log, runtime, architecture=architecture, acc=acc, best=best,
                             stages=run.all_stages())


def finish_supervised(args, log, runtime, *, architecture: Architecture, acc: float, best: dict,
                      stages: list) -> dict:
    """summary.json and the closing line of a supervised stage."""
    protocol = None
    if args.command == "linear":
        protocol = "cached centre-crop features" if args.cached_features else \
            "official: random crop + flip through the frozen backbone"
    summary = summarize(args, log, runtime, architecture=architecture, stages=stages,
                        protocol=protocol, test_top1_final=acc,
                        test_top1_best_chosen_on_test=best["test_top1"], best_epoch=best["epoch"])
    print(f"{args.command}{f' ({protocol})' if protocol else ''}: final-epoch test top-1 "
          f"{acc:.2f}% (best {best['test_top1']:.2f}% at epoch {best['epoch']}, chosen on the test "
          f"split); {stages[-1]['wall_s'] / 60:.1f} min")
    return summary


def knn(args) -> dict:
    """Weighted kNN top-1 of a checkpoint's backbone, or of the untrained one (seeded)."""
    runtime, architecture, bank, queries, net, _ = supervised_setup(args)
    log, t0 = run_log(args, runtime, architecture), time.time()
    acc, panel = knn_eval(runtime.place(net), bank, queries, input_size=architecture.input_size,
                          runtime=runtime, k=args.knn_k, t=args.knn_t,
                          title=(args.pretrained or "untrained") if runtime.is_main else None)
    if panel:
        panel.save(os.path.join(args.save_dir, "neighbours.png"))
    record = dict(knn_top1=round(acc, 2), k=args.knn_k, t=args.knn_t, bank=len(bank),
                  queries=len(queries), input_size=architecture.input_size,
                  wall_s=round(time.time() - t0, 1))
    log.record(record)
    log.summary(dict(command="knn", pretrained=args.pretrained, arch=architecture.arch,
                     conv5=architecture.conv5, **record))
    return record


# ----- the default job ----------------------------------------------------------------------------

def default_job(job=cli.DEFAULT_JOB) -> None:
    """`python train.py`: S3L on the built-in shapes at CPU scale, then kNN top-1 (k=200, T=0.1;
    the 2,000 train images as memory, 1,000 test images as queries), untrained vs pretrained."""
    t0 = time.time()
    args = cli.parse_args(job)
    summary = run_command(args)
    runtime = cli.runtime_for(args)
    architecture = resolve_architecture(args)
    store = store_args(args, runtime)
    bank = data.load_store(args.data, "train", args.input_size, min_crop_scale=args.crop_scale[0],
                           **store)
    queries = data.load_store(args.data, "test", args.input_size, **store)
    torch.manual_seed(args.seed)  # the very initialisation the pretraining started from
    nets = dict(untrained=architecture.build(), pretrained=architecture.build())
    _, pretrained = checkpoints.read_backbone(summary["checkpoint"])
    checkpoints.load_backbone(nets["pretrained"], pretrained)
    accs, panels = {}, []
    for name, net in nets.items():  # neighbours.png: the gain the table prints, as a picture
        accs[name], panel = knn_eval(runtime.place(net), bank, queries, input_size=args.input_size,
                                     runtime=runtime, k=args.knn_k, t=args.knn_t, title=name)
        panels.append(panel)
    before = accs["untrained"]
    if runtime.is_main:
        pictures.stack(panels).save(os.path.join(args.save_dir, "neighbours.png"))
    print(f"\nkNN top-1 on the built-in shapes ({len(queries)} test images, {len(data.SHAPES)} "
          f"classes, {architecture.arch} at {args.input_size} px, final epoch)")
    print(f"{'backbone':<34}{'kNN top-1 %':>12}")
    for name, acc in [("untrained", before),
                      (f"{args.method} pretrained, {args.epochs} epochs", summary["knn_top1"])]:
        print(f"{name:<34}{acc:>12.1f}")
    print(f"total time {time.time() - t0:.0f} s on {runtime.reason}; {summary['checkpoint']}; "
          f"views.png and neighbours.png beside it")


# ----- main ---------------------------------------------------------------------------------------

COMMANDS = {"pretrain": pretrain, "finetune": finetune, "warmup-conv5": finetune, "linear": linear,
            "knn": knn,
            "export": lambda args: checkpoints.export_backbone(args.checkpoint, args.out)}


def run_command(args):
    """One command in its own locked --save-dir (rank 0 holds the lock under torchrun: the folder
    is its alone); data errors become one line, not a trace."""
    cli.check_paths(args)
    locks = args.command != "export" and (devices.torchrun_ranks() or (0,))[0] == 0
    if locks:
        runs.lock_run_folder(args.save_dir)
    try:
        if locks:
            runs.claim_run_folder(args.save_dir, getattr(args, "resume", None), args.start_over)
        return COMMANDS[args.command](args)
    except ValueError as e:  # data errors (missing folders, a bad --subset)
        raise SystemExit(f"error: {e}") from None
    finally:
        if locks:
            runs.unlock_run_folder(args.save_dir)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    with devices.torchrun_scope():  # torchrun: rank 0 prints; the group is left at the end
        if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            # `python train.py --resume runs/default/checkpoint.pt` (the hint of an interrupted
            # default job), or any pretraining flag changed: the default job with these flags
            return default_job(cli.DEFAULT_JOB + argv)
        args = cli.parse_args(argv)
        if args.command is None:
            return cli.build_parser().print_help()
        run_command(args)


if __name__ == "__main__":
    main()
