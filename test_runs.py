"""Specifications of a run's bookkeeping: a failed run fails, an interrupted run keeps its work, no
flag crashes it; the run folder's lock, checkpoints, resume, the cache on a full disk.

Run: python -m pytest -q
"""
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import augment
import checkpoints
import cli
import data
import decode
import runs
import train

from conftest import (
    make_folder, pretrain_argv, run_child, same_weights, stage_argv, write_image)


# ----- faults: a failed run fails, an interrupted run keeps its work, no flag crashes it ---------

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
        cli.parse_args(["pretrain", *argv])
    assert message in capsys.readouterr().err


def test_workers_are_capped_at_the_cores_with_a_note(capsys):
    args = cli.parse_args(["pretrain", "--workers", "200"])
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
    if poison == "batch":  # views.png's 2 views, then 2 steps of 2 an epoch: the 7th on is NaN
        crop_resize, calls = augment.crop_resize, []
        monkeypatch.setattr(augment, "crop_resize", lambda *a, **k: crop_resize(*a, **k) * (
            float("nan") if calls.append(1) or len(calls) > 6 else 1.0))
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
    assert checkpoints.json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == \
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
                                                    "log.jsonl", "summary.json", "views.png"]


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
        decode.load_split(data.list_split(root, "train"), 32, cache, max_bytes=1 << 30)
        os.utime(next(p for p in (tmp_path / "cache").glob(f"{name}*.npy")), (seed, seed))
    decode.load_split(data.list_split(make_folder(tmp_path / "third", classes=1, per_class=4),
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
    monkeypatch.setattr(decode.shutil, "disk_usage", lambda p: shutil_usage(free=300 * 1024))
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
