"""Specifications of what surrounds the code: bench.py, the shape of the imports, README.md (its
links and the pieces it says to copy) and study.py (grids, cost accounting, the report).

Run: python -m pytest -q
"""
import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import cli
import data
import models
import study

from conftest import make_folder, run_child


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
    assert ".backward(" not in src and "train.pretrain_step" in src


# ----- README.md: its links resolve, and its pieces run copied alone ------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    return text.split(f"\n## {title}\n")[1].split("\n## ")[0]


def github_anchor(heading):
    return "".join(c for c in heading.lower() if c.isalnum() or c in " -_").replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", "RESULTS.md", "BENCHMARKS.md", "docs/data.md",
                                  "docs/gpus.md", "docs/study.md"])
def test_every_relative_link_of_the_documents_resolves(page):
    """[text](file) and [text](file#section) / (#section) point at files and headings that exist,
    from README.md and every page it sends a reader to."""
    here = os.path.dirname(os.path.join(ROOT, page))
    text = open(os.path.join(ROOT, page)).read()
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    assert links or page != "README.md", "the README has relative links"
    for link in links:
        path, _, anchor = link.partition("#")
        target = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, page)
        assert os.path.isfile(target), (page, link)
        if anchor:
            headings = re.findall(r"^#+ (.+)$", open(target).read(), flags=re.M)
            assert anchor in {github_anchor(h) for h in headings}, (page, link)


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
              "loss, outputs = moco(*views)\n"
              "loss.backward()\n"
              "health = p.measure(outputs)  # label-free health of the step's outputs\n"
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
    assert cli.parse_args(list(argvs["moco-112"])).lr == 0.03  # the last --lr wins
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
