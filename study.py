"""The S3L study: the paper's comparisons in one command, with cost accounting, a table and plots.

  python study.py --data DIR --grid resolution,architecture --eval finetune --seeds 2

Cao & Wu's claim is a trade-off: accuracy against training cost as self-supervised pretraining is
scaled down in resolution, architecture and data (README.md's "Paper map"). A study runs each *arm*
of a grid -- a chain of train.py commands: the pretraining stage(s), the conv5 warm-up where the
architecture needs it, then the evaluations -- once per seed, each command in its own run folder,
and writes results.md, results.json and PNG plots. A finished command is never run again (a killed
study continues where it stopped); a failed one marks its arm as failed and the study goes on.

Reading order: the grids (arms), an arm's commands, running them, cost accounting (PFLOPs from
MACs x passes), the report, the plots, the command line. Plotting uses pillow only.
"""
import argparse
import functools
import hashlib
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import checkpoints
import cli
import data
import health
import models
import runs
import s3l
import train

GRIDS = ("resolution", "architecture", "data", "method")
EVALS = ("finetune", "linear", "knn")
STAGES = ("pretrain", "warmup-conv5", "finetune", "linear", "knn")
# flags the study sets itself, per arm and stage; the rest of the command line goes to every stage
# that accepts the flag (--<stage>-args for one stage only)
STUDY_SETS = {"--data", "--save-dir", "--seed", "--input-size", "--epochs", "--init-from",
              "--pretrained", "--resume", "--conv5", "--no-conv5", "--method", "--subset"}


# ----- the grids: what each arm pretrains ---------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """One row of a grid. pretrain: one tuple of train.py flags per pretraining stage, in order (two
    stages: multi-stage resolution, the second initialised from the first); () is no pretraining.
    conv5=False is the small architecture: a conv5 warm-up comes before fine-tuning."""
    grid: str
    name: str
    pretrain: tuple
    conv5: bool = True


def grid_arms(grid: str, s: dict) -> list:
    """The arms of one grid. Every arm is evaluated at the full size s["full_size"].

    resolution (paper: pretrain at 224, 112 or 56, or 112 -> 224, fine-tune at 224): full, half,
    quarter, half-full (half for the arm's epochs, then full for --stage2-epochs), and the
    from-scratch baseline. architecture: the full backbone against no conv5 (then the warm-up), at
    --small-size. data: the whole train split against seeded subsets, at --small-size. method:
    MoCo v2, SimCLR and BYOL at --small-size and the same epochs."""
    full, small, method = s["full_size"], s["small_size"], ("--method", s["method"])

    def at(size, *flags):
        return ("--input-size", str(size), *flags)

    if grid == "resolution":
        half, quarter = full // 2, full // 4
        return [Arm(grid, "scratch", ()),
                Arm(grid, f"full-{full}", (at(full, *method),)),
                Arm(grid, f"half-{half}", (at(half, *method),)),
                Arm(grid, f"quarter-{quarter}", (at(quarter, *method),)),
                Arm(grid, f"half-{half}-then-{full}",
                    (at(half, *method), at(full, *method, "--epochs", str(s["stage2_epochs"]))))]
    if grid == "architecture":
        return [Arm(grid, f"conv5-{small}", (at(small, *method),)),
                Arm(grid, f"no-conv5-{small}", (at(small, *method, "--no-conv5"),), conv5=False)]
    if grid == "data":
        return [Arm(grid, f"all-{small}", (at(small, *method),))] + [
            Arm(grid, f"{spec.replace('=', '-').replace(',', '-')}-{small}",
                (at(small, *method, "--subset", spec),)) for spec in s["subsets"]]
    if grid == "method":
        return [Arm(grid, f"{m}-{small}", (at(small, "--method", m),))
                for m in ("moco", "simclr", "byol")]
    raise ValueError(f"--grid {grid}: expected one of {', '.join(GRIDS)}")


# ----- an arm's commands ------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    """One train.py command of an arm. Its folder is named by a hash of the command, so arms that
    share a command (the half-resolution arm and the architecture grid's conv5 arm, say) share its
    run, and a changed setting can never reuse an old result."""
    kind: str       # pretrain, warmup-conv5, finetune, linear, knn
    argv: tuple     # train.py arguments, --save-dir excepted
    folder: str     # STUDY/steps/<kind>-<hash>

    @property
    def checkpoint(self) -> str:
        return os.path.join(self.folder, "checkpoint.pt")


def make_step(study_dir: str, kind: str, argv: list) -> Step:
    digest = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:10]
    return Step(kind, tuple(argv), os.path.join(study_dir, "steps", f"{kind}-{digest}"))


def pretrain_args(flags: tuple, s: dict) -> list:
    """What a pretraining stage with the arm's `flags` gets after them: --pretrain-args, then the
    --<method>-args of its method (the method grid can give each method its own --lr)."""
    method = flags[flags.index("--method") + 1]
    return [*s["stage_args"]["pretrain"], *s["method_args"].get(method, [])]


def arm_steps(arm: Arm, seed: int, s: dict, epochs: list) -> tuple:
    """The train.py commands of one arm and seed, in order: (pretraining steps, {evaluation: its
    steps}). epochs: the pretraining epochs of each stage (None: the flags' or method's)."""
    common = ["--data", s["data"], "--seed", str(seed)]
    pretrain, previous = [], None
    for flags, n in zip(arm.pretrain, epochs):
        argv = ["pretrain", *common, *(["--epochs", str(n)] if n else []), *flags,
                *(["--init-from", previous.checkpoint] if previous else []),
                *pretrain_args(flags, s)]
        previous = make_step(s["save_dir"], "pretrain", argv)
        pretrain.append(previous)
    full = ["--input-size", str(s["full_size"])]
    evals = {}
    for kind in s["eval"]:
        source, chain = previous, []
        if kind == "finetune" and previous and not arm.conv5:  # the small architecture's step 2
            source = make_step(s["save_dir"], "warmup-conv5", [
                "warmup-conv5", *common, *full, "--pretrained", previous.checkpoint,
                *s["stage_args"]["warmup-conv5"]])
            chain.append(source)
        epochs = ["--epochs", str(s["eval_epochs"])] if s["eval_epochs"] and kind != "knn" else []
        argv = [kind, *common, *full, *(["--pretrained", source.checkpoint] if source else []),
                *epochs, *s["stage_args"][kind]]
        chain.append(make_step(s["save_dir"], kind, argv))
        evals[kind] = chain
    return pretrain, evals


def budget_epochs(arm: Arm, s: dict) -> list:
    """Pretraining epochs per stage. Equal epochs (the paper's protocol): --epochs for each arm, the
    second stage of a multi-stage arm --stage2-epochs. Equal compute (--budget-pflops): the first
    stage takes what the budget leaves after the second, so every arm costs about the same."""
    if not arm.pretrain:
        return []
    if not s["budget_pflops"]:
        return [s["epochs"]] + [None] * (len(arm.pretrain) - 1)
    costs = [pretrain_pflops_per_epoch(["pretrain", "--data", s["data"], *flags,
                                        *pretrain_args(flags, s)]) for flags in arm.pretrain]
    later = sum(c * s["stage2_epochs"] for c in costs[1:])
    first = max(1, round((s["budget_pflops"] - later) / costs[0]))
    return [first] + [None] * (len(arm.pretrain) - 1)


def pretrain_pflops_per_epoch(argv: list) -> float:
    """PFLOPs of one pretraining epoch of the command, before it runs (the listing, not the decoded
    store: unreadable files are not known yet)."""
    args = cli.parse_args(argv)
    architecture = train.resolve_architecture(args)
    listing = data.list_split(args.data, args.train_split)
    n = len(listing.paths)
    if args.subset:
        n = len(data.subset_indices(listing.labels, args.subset, args.seed))
    images = n // args.batch_size * args.batch_size
    macs = models.macs(architecture.build(), architecture.input_size)
    return 2 * macs * s3l.PASSES[args.method] * images / 1e15


# ----- running the steps ------------------------------------------------------------------------

class StepFailed(Exception):
    pass


def run_step(step: Step, launcher: list) -> dict:
    """Run one train.py command in its folder, or reuse it: a folder with summary.json is finished.
    A folder with a checkpoint but no summary was stopped: the command resumes from it. Output goes
    to output.txt in the folder. Returns the summary; a failure raises StepFailed with the error."""
    summary_path = os.path.join(step.folder, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            return dict(json.load(f), reused=True)
    resume = step.kind != "knn" and os.path.exists(step.checkpoint)
    os.makedirs(step.folder, exist_ok=True)
    with open(os.path.join(step.folder, "command.txt"), "w") as f:
        f.write(shlex.join(["python", "train.py", *step.argv, "--save-dir", step.folder]) + "\n")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    argv = [*launcher, script, *step.argv, "--save-dir", step.folder,
            *(["--resume", step.checkpoint] if resume else [])]
    print(f"  {'resume' if resume else 'run'} {step.kind}: {step.folder}/output.txt", flush=True)
    with open(os.path.join(step.folder, "output.txt"), "a") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        # SIGTERM to the study is passed on; Ctrl-C reaches the child by itself. Either way the
        # child ends its step, saves a checkpoint and exits 130 or 143, and the study waits
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: child.send_signal(signum))
        try:
            try:
                status = child.wait()
            except KeyboardInterrupt:
                status = child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
    if status in (130, 143):  # interrupted (SIGINT, SIGTERM), its step saved: so does the study
        raise KeyboardInterrupt
    if status != 0 or not os.path.exists(summary_path):
        with open(os.path.join(step.folder, "output.txt"), errors="replace") as f:
            lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines()
                     if line.strip()]
        raise StepFailed(f"{step.kind} exited with status {status}: " + " | ".join(lines[-3:]))
    with open(summary_path) as f:
        return dict(json.load(f), reused=False)


def run_arm(arm: Arm, seed: int, s: dict) -> dict:
    """Every step of one arm and seed; the record of results.json. A failed pretraining fails the
    arm; a failed evaluation only that evaluation."""
    pretrain, evals = arm_steps(arm, seed, s, budget_epochs(arm, s))
    record = dict(grid=arm.grid, arm=arm.name, seed=seed, status="ok", errors={}, accuracy={},
                  steps=[], commands=[])
    try:
        summaries = [run_step(step, s["launcher"]) for step in pretrain]
    except StepFailed as e:
        return dict(record, status="failed", errors={"pretrain": str(e)},
                    commands=[shlex.join(["python", "train.py", *st.argv]) for st in pretrain])
    record["steps"] += [step_cost(st, sm) for st, sm in zip(pretrain, summaries)]
    for kind, chain in evals.items():
        try:
            ends = [run_step(step, s["launcher"]) for step in chain]
            record["accuracy"][kind] = ends[-1].get("knn_top1", ends[-1].get("test_top1_final"))
            record["steps"] += [step_cost(st, sm) for st, sm in zip(chain, ends)]
        except StepFailed as e:
            record["errors"][kind] = str(e)
            record["status"] = "failed"
    record["commands"] = [shlex.join(["python", "train.py", *st.argv, "--save-dir", st.folder])
                          for st in pretrain + [st for chain in evals.values() for st in chain]]
    curves = [read_log(st.folder) for st in pretrain]
    # the median epoch: the first one's cuDNN autotuning or graph capture left out
    seconds = [t for c in curves for t in c["epoch_s"]]
    record["epoch_s"] = statistics.median(seconds) if seconds else None
    record["curves"] = dict(loss=sum((c["loss"] for c in curves), []), **{
        key: [[sum(len(c["loss"]) for c in curves[:i]) + e, v]  # the stages' epochs in a row
              for i, c in enumerate(curves) for e, v in c[key]] for key in ("knn", "rank")})
    return record


def read_log(folder: str) -> dict:
    """Per-epoch pretraining loss, kNN monitor, effective rank (health.py) and seconds from
    log.jsonl: {"loss": [...], "knn": [[epoch, top-1], ...], "rank": [[epoch, rank], ...],
    "epoch_s": [...]}."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        epochs = [r for r in map(json.loads, f) if "epoch" in r and "loss" in r]

    def pairs(key):
        return [[r["epoch"], r[key]] for r in epochs if r.get(key) is not None]
    return dict(loss=[r["loss"] for r in epochs], knn=pairs("knn_top1"), rank=pairs("rank"),
                epoch_s=[r["epoch_s"] for r in epochs if r.get("epoch_s") is not None])


# ----- cost accounting --------------------------------------------------------------------------

def stage_pflops(stage: dict) -> float:
    """Training PFLOPs of one stage record of summary.json: 2 x MACs x passes x images trained."""
    kind, macs = stage["command"], stage["macs_per_image"]
    images = stage["images_per_epoch"] * stage["epochs"]
    if kind == "pretrain":
        passes = s3l.PASSES[stage["method"]]
    elif kind == "warmup-conv5":  # forward through all, backward through conv5 (+ fc) only
        conv5 = macs - models.macs(models.ARCHS[stage["arch"]](
            conv5=False, small_stem=stage["small_stem"], num_classes=0), stage["input_size"])
        passes = 1 + 2 * conv5 / macs
    elif kind == "linear" and stage.get("cached_features"):  # one forward pass, then fc alone
        images = stage["images_per_epoch"]
        passes = 1
    else:
        passes = s3l.PASSES[kind]
    return 2 * macs * passes * images / 1e15


def step_cost(step: Step, summary: dict) -> dict:
    """What results.json keeps of a step: kind, folder, wall time, MACs and PFLOPs of its own
    stage (the last of its summary's stages; kNN trains nothing), images/s, device."""
    own = summary["stages"][-1] if summary.get("stages") and step.kind != "knn" else None
    return dict(kind=step.kind, folder=step.folder, wall_s=summary.get("wall_s"),
                input_size=summary.get("input_size"),
                macs_per_image=own and own["macs_per_image"],
                pflops=float(f"{stage_pflops(own):.6g}") if own else 0.0,
                images_per_s=summary.get("images_per_s"), device=summary.get("device"),
                reused=summary["reused"])


# ----- the report -------------------------------------------------------------------------------

def mean_std(values: list) -> tuple:
    """Mean and sample standard deviation (0 for one value), or (None, None) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list, evals: list) -> list:
    """One row per arm over its seeds: accuracy mean +- std per evaluation, pretraining PFLOPs and
    minutes, the PFLOPs of all its training (warm-up and fine-tuning too), evaluation minutes,
    pretraining images/s and median seconds an epoch, and the failures."""
    rows = {}
    for r in records:
        rows.setdefault((r["grid"], r["arm"]), []).append(r)
    out = []
    for (grid, arm), rs in rows.items():
        ok = [r for r in rs if r["steps"]]
        pre = [[st for st in r["steps"] if st["kind"] == "pretrain"] for r in ok]
        rest = [[st for st in r["steps"] if st["kind"] != "pretrain"] for r in ok]
        row = dict(grid=grid, arm=arm, seeds=len(rs), failed=[f"seed {r['seed']}: {e}" for r in rs
                                                              for e in r["errors"].values()])
        for kind in evals:
            row[kind] = mean_std([r["accuracy"].get(kind) for r in rs])
            row[f"{kind}_n"] = sum(r["accuracy"].get(kind) is not None for r in rs)
        pre = [p for p in pre if p]  # the from-scratch baseline has no pretraining cost to show
        row["pretrain_pflops"] = mean_std([sum(st["pflops"] for st in p) for p in pre])[0]
        row["pretrain_min"] = mean_std([sum(st["wall_s"] or 0 for st in p) / 60 for p in pre])[0]
        row["eval_min"] = mean_std([sum(st["wall_s"] or 0 for st in p) / 60 for p in rest])[0]
        row["total_pflops"] = mean_std([sum(st["pflops"] for st in r["steps"]) for r in ok])[0]
        row["images_per_s"] = mean_std([p[0]["images_per_s"] for p in pre if p])[0]
        row["epoch_s"] = mean_std([r.get("epoch_s") for r in ok])[0]
        out.append(row)
    return out


def results_markdown(rows: list, evals: list, records: list, settings: dict) -> str:
    """results.md: one table per grid (arms as rows), the best of each column in bold (highest
    accuracy, least cost), failures, and every arm's commands."""
    lines = [f"# S3L study on {settings['data']}", "",
             "Final-epoch top-1 (%), mean ± sample std over the seeds that finished; evaluated "
             f"at {settings['full_size']} px. PFLOPs = 2 × MACs × backbone passes × images "
             f"trained (s3l.PASSES). Device: {devices(records)}.", ""]
    columns = [(k, f"{k} top-1 %", max) for k in evals] + [
        ("pretrain_pflops", "pretrain PFLOPs", min), ("total_pflops", "all training PFLOPs", min),
        ("pretrain_min", "pretrain min", min), ("eval_min", "eval min", min),
        ("images_per_s", "pretrain img/s", max), ("epoch_s", "pretrain s/epoch (median)", min)]
    for grid in dict.fromkeys(r["grid"] for r in rows):
        mine = [r for r in rows if r["grid"] == grid]
        lines += [f"## {grid}", "", "| arm | " + " | ".join(c[1] for c in columns) + " |",
                  "|---|" + "---:|" * len(columns)]
        best = {}
        for key, _, pick in columns:
            values = [cell_value(r[key]) for r in mine if cell_value(r[key]) is not None]
            best[key] = pick(values) if values else None
        for r in mine:
            cells = []
            for key, _, _ in columns:
                text = cell_text(r, key)
                cells.append(f"**{text}**" if best[key] is not None and
                             cell_value(r[key]) == best[key] else text)
            lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- {r['arm']} failed: {f}" for r in mine for f in r["failed"]]
        lines.append("")
    lines += ["## Commands", ""]
    for r in records:
        lines += [f"{r['grid']}/{r['arm']} seed {r['seed']}:", "```", *r["commands"], "```", ""]
    return "\n".join(lines)


def cell_value(value):
    return value[0] if isinstance(value, tuple) else value


def cell_text(row: dict, key: str) -> str:
    value = row[key]
    if isinstance(value, tuple):
        mean, std = value
        if mean is None:
            return "failed"
        return f"{mean:.2f} ± {std:.2f}" if row[f"{key}_n"] > 1 else f"{mean:.2f}"
    if value is None:
        return "—"
    if key.endswith("pflops"):
        return f"{value:.4g}"
    return f"{value:.2f}" if key == "epoch_s" else f"{value:.1f}"


def devices(records: list) -> str:
    found = {st["device"] for r in records for st in r["steps"] if st.get("device")}
    return "; ".join(sorted(found)) or "unknown"


# ----- the plots: pillow only ---------------------------------------------------------------------

def plot(path: str, series: list, xlabel: str, ylabel: str, title: str, x_from=None) -> None:
    """health.chart (series: dicts with label, x, y, optional yerr and lines) saved as PNG."""
    health.chart(series, xlabel, ylabel, title, x_from=x_from).save(path)


def draw_plots(folder: str, rows: list, records: list, evals: list) -> list:
    """compute_<eval>.png: accuracy against pretraining compute, one point per arm with its seed
    spread; loss.png, knn.png and rank.png: the pretraining curves of every arm and seed (rank,
    health.py's, compares the arms without labels)."""
    paths = []
    for kind in evals:
        # the from-scratch baseline sits at 0 PFLOPs of pretraining; arms that share every step
        # (half-32, conv5-32 and all-32, say) are one point, with one legend entry naming them all
        points = {}
        for r in rows:
            if r[kind][0] is not None:
                point = (r["pretrain_pflops"] or 0.0, r[kind][0], r[kind][1])
                points.setdefault(point, []).append(r["arm"])
        series = [dict(label=" = ".join(dict.fromkeys(arms)), x=[x], y=[y], yerr=[err])
                  for (x, y, err), arms in points.items()]
        paths.append(os.path.join(folder, f"compute_{kind}.png"))
        plot(paths[-1], series, "pretraining compute (PFLOPs)", f"{kind} top-1 (%)",
             f"{kind} top-1 against pretraining compute (mean ± std over seeds)", x_from=0)
    names = {}  # arms that share their pretraining (half-32 and conv5-32, say) are one curve
    for r in records:
        shared = tuple(st["folder"] for st in r["steps"] if st["kind"] == "pretrain")
        names.setdefault(shared, []).append(r["arm"])
    # multi-stage arms first: their first stage is another arm's whole curve (half-32's in
    # half-32-then-64), which is then drawn over it instead of hidden under it
    records = sorted(records, key=lambda r: -sum(st["kind"] == "pretrain" for st in r["steps"]))
    for key, ylabel in (("loss", "pretraining loss"), ("knn", "kNN monitor top-1 (%)"),
                        ("rank", "effective rank of the features")):  # rank: label-free
        series, drawn = [], set()
        for r in records:
            shared = tuple(st["folder"] for st in r["steps"] if st["kind"] == "pretrain")
            points = r.get("curves", {}).get(key) or []
            if key == "loss":
                points = [[e + 1, v] for e, v in enumerate(points) if v is not None]
            if points and shared not in drawn:
                drawn.add(shared)
                label = " = ".join(dict.fromkeys(names[shared]))
                series.append(dict(label=label, x=[p[0] for p in points],
                                   y=[p[1] for p in points], lines=True))
        paths.append(os.path.join(folder, f"{key}.png"))
        plot(paths[-1], series, "epoch (multi-stage: the stages in a row)", ylabel,
             f"{ylabel} per epoch, at each arm's pretraining size; a line per seed")
    return paths


# ----- the command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="study.py", formatter_class=cli.HelpFormatter,
        allow_abbrev=False,  # --seed or --subset must not pass for --seeds or --subsets
        description="The paper's comparisons in one command: each arm of each grid is a chain of "
        "train.py commands (pretraining, the conv5 warm-up for the small architecture, the "
        "evaluations), run once per seed; results.md, results.json and PNG plots go to --save-dir. "
        "Any other flag goes to every stage that accepts it (--arch resnet18 --train-split "
        "train+val, ...); --<stage>-args gives flags to one stage only, --<method>-args to one "
        "method's pretraining only.")
    p.add_argument("--data", required=True, help="dataset root, as for every train.py command")
    p.add_argument("--grid", default="resolution", help=f"comma-separated: {', '.join(GRIDS)}")
    p.add_argument("--arms", help="comma-separated arm names to run (default: all of the grids)")
    p.add_argument("--eval", default="finetune", help=f"comma-separated: {', '.join(EVALS)}")
    p.add_argument("--seeds", type=cli.number(int, 1), default=1, help="runs of each arm "
                   "(seeds 0..N-1): mean ± std")
    p.add_argument("--full-size", type=cli.number(int, 8), default=224, help="'full' resolution "
                   "in px: the paper's 224; the size of every evaluation")
    p.add_argument("--small-size", type=cli.number(int, 8), help="pretraining size of the "
                   "architecture, data and method grids (default: full / 2, the paper's 112)")
    p.add_argument("--method", choices=sorted(s3l.METHOD_DEFAULTS), default="moco",
                   help="pretraining method outside the method grid (MoCo v2: the paper's main "
                   "one)")
    p.add_argument("--epochs", type=cli.number(int, 1), help="pretraining epochs of every arm "
                   "(default: the method's)")
    p.add_argument("--stage2-epochs", type=cli.number(int, 1), help="epochs at full size after "
                   "the half-size stage of the multi-stage arm (default: epochs / 4, the paper's "
                   "200 + 50)")
    p.add_argument("--eval-epochs", type=cli.number(int, 1), help="epochs of fine-tuning and of "
                   "the linear probe (default: theirs, 120 and 30)")
    p.add_argument("--subsets", default="50%,25%", help="data grid: the seeded subsets of the "
                   "train split, comma-separated: P%% (a fraction of every class), or train.py "
                   "--subset specs (per-class=N, total=N, classes=C+total=N)")
    p.add_argument("--budget-pflops", type=cli.number(float, 0, open_low=True), help="equal "
                   "compute instead of equal epochs: each arm's pretraining epochs are set so it "
                   "costs about this many PFLOPs")
    p.add_argument("--launcher", default=sys.executable, help="how each command starts, e.g. "
                   "'torchrun --standalone --nproc_per_node 4'")
    p.add_argument("--save-dir", default="runs/study")
    for stage in STAGES:
        p.add_argument(f"--{stage}-args", default="", help=f"flags for the {stage} commands only, "
                       "as one quoted string")
    for method in sorted(s3l.METHOD_DEFAULTS):
        p.add_argument(f"--{method}-args", default="", help=f"flags for the {method} pretraining "
                       "commands only, after --pretrain-args (the method grid: e.g. each method's "
                       "own --lr)")
    return p


def forwarded_args(extra: list) -> dict:
    """The command line's other flags, given to each stage that accepts them: {stage: argv}."""
    groups = []
    for token in extra:
        if token.startswith("--"):
            groups.append([token])
        elif groups:
            groups[-1].append(token)
        else:
            raise SystemExit(f"study: '{token}' is not a flag (flags start with --)")
    out = {stage: [] for stage in STAGES}
    for group in groups:
        flag = group[0].split("=", 1)[0]
        if flag in STUDY_SETS:
            raise SystemExit(f"study: {flag} is set by the study per arm; use the study's own "
                             "flags (--full-size, --epochs, --method, --subsets, ...) or "
                             "--<stage>-args")
        takers = [stage for stage in STAGES if flag in stage_flags(stage)]
        if not takers:
            raise SystemExit(f"study: no train.py stage accepts {flag} (see train.py CMD --help)")
        for stage in takers:
            out[stage] += group
    return out


@functools.lru_cache(maxsize=None)
def stage_flags(stage: str) -> set:
    return cli.stage_flags(stage)


def resolve(argv: list) -> dict:
    """The study's settings as plain values, resolved once."""
    args, extra = build_parser().parse_known_args(argv)
    grids = [g for g in args.grid.split(",") if g]
    evals = [e for e in args.eval.split(",") if e]
    for name, values, allowed in (("--grid", grids, GRIDS), ("--eval", evals, EVALS)):
        if not values or set(values) - set(allowed):
            raise SystemExit(f"study: {name} {','.join(values)}: expected a comma-separated list "
                             f"of {', '.join(allowed)}")
    epochs = args.epochs or s3l.METHOD_DEFAULTS[args.method]["epochs"]
    stage_args = forwarded_args(extra)
    for stage in STAGES:
        stage_args[stage] += shlex.split(getattr(args, f"{stage.replace('-', '_')}_args"))
    method_args = {m: shlex.split(getattr(args, f"{m}_args")) for m in s3l.METHOD_DEFAULTS}
    return dict(data=args.data, grids=grids, arms=args.arms.split(",") if args.arms else None,
                eval=evals, seeds=args.seeds, full_size=args.full_size,
                small_size=args.small_size or args.full_size // 2, method=args.method,
                epochs=epochs, stage2_epochs=args.stage2_epochs or max(1, epochs // 4),
                eval_epochs=args.eval_epochs,
                subsets=[subset_spec(s) for s in args.subsets.split(",") if s],
                budget_pflops=args.budget_pflops, launcher=shlex.split(args.launcher),
                save_dir=args.save_dir, stage_args=stage_args,
                method_args={m: flags for m, flags in method_args.items() if flags})


def subset_spec(text: str) -> str:
    """A --subsets entry as train.py's --subset: "25%" is fraction=0.25 (of every class)."""
    if text.endswith("%"):
        return f"fraction={float(text[:-1]) / 100:g}"
    return text.replace("+", ",")


# what defines the arms' results; grids, arms, evaluations and seeds may be added to a study folder
DEFINING = ("data", "full_size", "small_size", "method", "epochs", "stage2_epochs", "eval_epochs",
            "subsets", "budget_pflops", "stage_args", "method_args")


def check_study_folder(s: dict) -> None:
    """A study folder holds one set of settings: another set is refused, not mixed in."""
    path = os.path.join(s["save_dir"], "study.json")
    mine = {k: s[k] for k in DEFINING}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old.setdefault("method_args", {})  # a study folder from before --<method>-args
        differ = [f"{k}: {old.get(k)!r} there, {mine[k]!r} now" for k in DEFINING
                  if old.get(k) != mine[k]]
        if differ:
            raise SystemExit(f"study: {s['save_dir']} holds a study with other settings ("
                             + "; ".join(differ) + "): use another --save-dir, or the same flags")
    checkpoints.write_json(path, mine)


def main(argv: list) -> dict:
    """Run every arm of the chosen grids for every seed; write results.md, results.json, plots."""
    s = resolve(argv)
    arms = [arm for grid in s["grids"] for arm in grid_arms(grid, s)]
    if s["arms"]:
        unknown = set(s["arms"]) - {a.name for a in arms}
        if unknown:
            raise SystemExit(f"study: --arms {','.join(sorted(unknown))}: not in the grids; they "
                             f"have {', '.join(a.name for a in arms)}")
        arms = [a for a in arms if a.name in s["arms"]]
    for arm in arms:  # every command parsed before any work: a bad flag stops the study here
        for step in [st for seed in range(s["seeds"]) for st in steps_of(arm, seed, s)]:
            cli.parse_args(list(step.argv))
    runs.lock_run_folder(s["save_dir"])
    check_study_folder(s)
    t0, records = time.time(), []
    try:
        for seed in range(s["seeds"]):
            for i, arm in enumerate(arms):
                print(f"[{arm.grid} {i + 1}/{len(arms)}] {arm.name}, seed {seed}", flush=True)
                records.append(run_arm(arm, seed, s))
                r = records[-1]
                print(f"  {r['status']}: " + ", ".join(f"{k} {v:.2f}%" for k, v in
                                                      r["accuracy"].items())
                      + "".join(f" [{k} failed: {e}]" for k, e in r["errors"].items()), flush=True)
                # after every arm, so that a killed study still has its table
                rows, plots = write_report(s, records)
    except KeyboardInterrupt:
        raise SystemExit(f"study interrupted: the same command continues it "
                         f"(finished steps are kept in {s['save_dir']}/steps)") from None
    finally:
        runs.unlock_run_folder(s["save_dir"])
    ran = sum(not st["reused"] for r in records for st in r["steps"])
    reused = sum(st["reused"] for r in records for st in r["steps"])
    print(f"study: {len(records)} arm runs, {ran} steps run, {reused} reused from earlier runs; "
          f"{(time.time() - t0) / 60:.1f} min; {s['save_dir']}/results.md, results.json, "
          + ", ".join(os.path.basename(p) for p in plots))
    return dict(rows=rows, records=records, steps_run=ran)


def write_report(s: dict, records: list) -> tuple:
    """results.json, results.md and the plots of the arms run so far: (rows, plot paths)."""
    rows = summarise(records, s["eval"])
    checkpoints.write_json(os.path.join(s["save_dir"], "results.json"),
              dict(settings=s, arms=rows, runs=records))
    with open(os.path.join(s["save_dir"], "results.md"), "w") as f:
        f.write(results_markdown(rows, s["eval"], records, s))
    return rows, draw_plots(s["save_dir"], rows, records, s["eval"])


def steps_of(arm: Arm, seed: int, s: dict) -> list:
    pretrain, evals = arm_steps(arm, seed, s, budget_epochs(arm, s))
    return pretrain + [st for chain in evals.values() for st in chain]


if __name__ == "__main__":
    main(sys.argv[1:])
