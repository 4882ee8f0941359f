"""Specifications of the command line and the stages of the recipe: pretrain and its flags, the
supervised stages (fine-tuning, the conv5 warm-up, the linear probe), export, and every training
command under torchrun (2 CPU processes, gloo, 127.0.0.1).

Run: python -m pytest -q
"""
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import augment
import checkpoints
import cli
import data
import devices
import models
import s3l
import train

from conftest import (
    RecordedGraph, finished, gen, make_folder, pretrain_argv, randn, same_weights, stage_argv)


# ----- train.py: the command line, checkpoints, bad input -----------------------------------------

def test_byol_refuses_the_head_flag(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["pretrain", "--method", "byol", "--head", "mlp-bn"])
    assert "--head is for moco and simclr" in capsys.readouterr().err


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
    graphed_step = devices.GraphedStep
    monkeypatch.setattr(cli, "check_cuda_graphs", lambda args, runtime: None)  # a CPU here
    monkeypatch.setattr(devices, "GraphedStep", lambda step, optimizer: graphed_step(
        step, optimizer, warmup=2, capture=RecordedGraph.capture))
    train.main(pretrain_argv(root, tmp_path / "graphed", "--save-every", "1", "--cuda-graphs"))
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
    assert len(sigmas) == 6 and all((s == 0).all() for s in sigmas)  # views.png's 2, 2 steps
    sigmas.clear()
    train.main(pretrain_argv(root, tmp_path / "blurred", "--epochs", "1"))
    assert 0 < torch.cat(sigmas).gt(0).sum() < 48  # 6 views of 8 images, p 0.5


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
    forced = devices.Runtime(torch.device("cpu"), torch.float16, True, "fp16: forced on CPU")
    monkeypatch.setattr(cli, "runtime_for", lambda args: forced)
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
    args = cli.parse_args(["pretrain", "--method", method, "--batch-size", str(batch)])
    assert args.warmup_epochs == warmup
    args = cli.parse_args(["pretrain", "--method", method, "--warmup-epochs", "3"])
    assert args.warmup_epochs == 3


def test_byol_keeps_its_predictor_unless_asked_for_the_ablation_that_collapses():
    """--no-byol-predictor (BYOL's Table 5b ablation, README's collapsed run) builds no predictor
    and is shape-defining for --resume; the default builds BYOL's Linear-BN-ReLU-Linear."""
    args = cli.parse_args(["pretrain", "--method", "byol", "--byol-hidden-dim", "16"])
    assert args.byol_predictor is True
    predictor = train.build_method(args, models.resnet18()).predictor
    assert [type(m).__name__ for m in predictor] == ["Linear", "SplitBatchNorm", "ReLU", "Linear"]
    args = cli.parse_args(["pretrain", "--method", "byol", "--no-byol-predictor"])
    assert isinstance(train.build_method(args, models.resnet18()).predictor, torch.nn.Identity)
    assert "byol_predictor" in checkpoints.SHAPE_DEFINING


def test_every_value_of_the_defaults_blocks_has_a_comment():
    """METHOD_DEFAULTS and STAGE_DEFAULTS: each line holding a value says why or in what unit."""
    src = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "s3l.py")).read()
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


# ----- train.py under torchrun: 2 processes on CPU (gloo) -----------------------------------------

# S3L's small architecture: BN over 4 images of layer4's 2 x 2 px amplifies float rounding (one
# process on 2 threads vs 1 differs by 4e-4 after 8 steps); without it 2 processes match 1 to 2e-6
TORCHRUN_ARGS = ("--method", "moco", "--small-stem", "--no-conv5", "--lr", "0.01", "--knn-every",
                 "1")


# run by torchrun: train.py, with a digest of every process's state after every epoch written next
# to this script (check_finite_weights runs on every process at the end of every epoch)
DIGESTING_TRAIN = """import os, sys
import checkpoints, train
check = checkpoints.check_finite_weights
def check_and_digest(module, epoch, *causes):
    check(module, epoch, *causes)
    name = f"rank{os.environ['RANK']}-epoch{epoch}"
    open(os.path.join(os.path.dirname(__file__), name), "w").write(
        checkpoints.state_digest(module.state_dict()))
checkpoints.check_finite_weights = check_and_digest
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
                                               "log.jsonl", "neighbours.png", "summary.json",
                                               "views.png"]
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
    r50 = checkpoints.backbone_state(models.resnet50().state_dict())
    with pytest.raises(ValueError, match=r"missing keys: .*unexpected keys: layer1.0.conv3.weight"):
        checkpoints.load_backbone(models.resnet18(), r50)


def test_backbone_state_strips_official_moco_and_byol_prefixes():
    """Official checkpoints: module.encoder_q.* (MoCo/SimCLR DDP), encoder_q.* (BYOL); heads, queue
    dropped."""
    sd = models.resnet18().state_dict()
    official = {f"module.encoder_q.{k}": v for k, v in sd.items()}
    official.update({"module.encoder_q.fc.0.weight": torch.zeros(2, 2),
                     "module.queue": torch.zeros(2, 2),
                     "module.encoder_k.conv1.weight": torch.zeros(1)})
    assert checkpoints.backbone_state(official).keys() == sd.keys()
    byol = {f"encoder_q.{k}": v for k, v in sd.items()} | {"projector.net.0.weight": torch.zeros(1)}
    assert checkpoints.backbone_state(byol).keys() == sd.keys()


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


def test_the_linear_probe_trains_on_random_resized_crops_and_fine_tuning_on_resize_crop():
    """The official CUB linear script: RandomResizedCrop (area 0.08-1) + flip; fine-tuning:
    Resize -> RandomCrop + flip, whose crops all have the input's size at the resized scale."""
    assert cli.parse_args(["linear", "--data", "x"]).random_resized_crop is True
    assert cli.parse_args(["linear"]).random_resized_crop is False  # the built-in 32 px shapes
    assert cli.parse_args(["finetune", "--data", "x"]).random_resized_crop is False
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


def test_the_cached_feature_probe_resumes_where_the_uninterrupted_one_ends(pretrained_run,
                                                                          capsys):
    """linear --cached-features is a run like the others (runs.Run): one epoch, then --resume to
    two, trains epoch 2 only and gives the two-epoch probe's fc and log bit for bit (the lr steps
    at 10 and 20 lie beyond both, so --epochs changes nothing else)."""
    tmp, _ = pretrained_run
    ckpt = str(tmp / "full" / "checkpoint.pt")

    def probe(save, *extra):
        train.main(["linear", "--pretrained", ckpt, "--cached-features", "--batch-size", "256",
                    "--save-dir", str(tmp / save), *extra])
        return tmp / save
    whole = probe("probe-2", "--epochs", "2")
    part = probe("probe-1", "--epochs", "1")
    capsys.readouterr()
    probe("probe-1", "--epochs", "2", "--resume", str(part / "checkpoint.pt"), "--force-resume")
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out, out
    assert same_weights(whole / "checkpoint.pt", part / "checkpoint.pt")
    logs = [[json.loads(line) for line in open(d / "log.jsonl")] for d in (whole, part)]
    assert [(r["loss"], r["test_top1"]) for r in logs[0]] == \
        [(r["loss"], r["test_top1"]) for r in logs[1]]


def test_warmup_trains_only_conv5_and_fc(pretrained_run):
    """conv1-4 come from the small-architecture checkpoint and stay bit-identical; layer4 and fc
    move."""
    tmp, root = pretrained_run
    train.main(stage_argv("warmup-conv5", root, tmp, "warmup", "--pretrained", str(tmp / "small" /
                                                                                   "checkpoint.pt"),
                          "--frozen-bn-eval"))
    small = torch.load(tmp / "small" / "checkpoint.pt", weights_only=True)["model"]
    ssl = checkpoints.backbone_state(small)
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
    ssl = checkpoints.backbone_state(torch.load(ckpt, weights_only=True)["model"])
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
    ssl = checkpoints.backbone_state(torch.load(ckpt, weights_only=True)["model"])
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
