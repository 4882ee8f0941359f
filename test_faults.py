"""Specifications of the faults a user meets (issue 33's cases): a resume never writes into another
run's folder, kNN votes stay finite at any temperature, a full disk or Ctrl-C at the start leaves
nothing behind, a damaged cache entry is decoded again, a file that is not regular is skipped.

Run: python -m pytest -q
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import cli
import data
import decode
import runs
import s3l
import train
from conftest import make_folder, write_image

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_pretrain(root, *extra):
    """MoCo on 16 px images, 2 steps an epoch: a finished run in a second."""
    return ["pretrain", "--data", root, "--arch", "resnet18", "--input-size", "16",
            "--batch-size", "8", "--moco-k", "16", "--bn-batch", "4", "--print-freq", "1",
            "--knn-every", "0", *extra]


def dead_pid() -> int:
    """The pid of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ----- a resume continues its own run, in its own folder ------------------------------------------

def test_a_resume_without_save_dir_continues_in_its_checkpoints_folder_not_in_another_run(
        tmp_path, monkeypatch, capsys):
    """Run A finished in the default folder runs/pretrain; resuming run B (saved elsewhere) without
    --save-dir continues B in B's folder and leaves every byte of A as it was; naming A's folder
    for B is refused."""
    monkeypatch.chdir(tmp_path)
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    cache = ["--cache-dir", str(tmp_path / "cache")]
    train.main(tiny_pretrain(root, "--epochs", "1", *cache))  # run A, in runs/pretrain
    a = tmp_path / "runs" / "pretrain"
    before = {name: (a / name).read_bytes() for name in os.listdir(a) if name != ".lock"}
    b = tmp_path / "elsewhere"
    train.main(tiny_pretrain(root, "--epochs", "2", "--seed", "7", "--save-every", "1",
                             "--save-dir", str(b), *cache))
    (b / "summary.json").unlink()
    os.replace(b / "checkpoint_0001.pt", b / "checkpoint.pt")  # B: interrupted after epoch 1
    train.main(tiny_pretrain(root, "--epochs", "2", "--seed", "7", "--save-every", "1",
                             "--resume", str(b / "checkpoint.pt"), *cache))
    assert {name: (a / name).read_bytes() for name in before} == before
    assert json.load(open(b / "config.json"))["seed"] == 7 and (b / "summary.json").exists()
    with pytest.raises(SystemExit, match="holds another run's results .* not the run of --resume"):
        train.main(tiny_pretrain(root, "--epochs", "2", "--seed", "7", "--save-every", "1",
                                 "--resume", str(b / "checkpoint.pt"), "--save-dir", str(a),
                                 *cache))
    assert {name: (a / name).read_bytes() for name in before} == before


def test_the_default_jobs_resume_hint_is_a_command_that_runs(monkeypatch):
    """An interrupted default job says `--resume runs/default/checkpoint.pt`: `python train.py`
    with that flag is the default job resumed, not an invalid command."""
    jobs = []
    monkeypatch.setattr(train, "default_job", jobs.append)
    train.main(["--resume", "runs/default/checkpoint.pt"])
    args = cli.parse_args(jobs[0])
    assert args.resume == "runs/default/checkpoint.pt" and args.save_dir == "runs/default"
    assert args.method == "simclr" and args.input_size == 32


# ----- kNN votes --------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.005, 0.01, 0.1, 1.0])
def test_knn_is_right_on_separable_features_at_any_temperature(t):
    """exp(cos / t) overflows float32 where cos / t > 88.7; the votes are taken relative to each
    query's nearest neighbour, so a small t still classifies two close but separated clusters
    exactly, every one of the k = 50 neighbours (both classes) at cos > 0.6 (the overflow gave
    both classes an infinite vote, and argmax answered class 0 for every query: 50 % here)."""
    g = torch.Generator().manual_seed(0)
    base, apart = F.normalize(torch.randn(2, 16, generator=g), dim=1)
    centres = F.normalize(torch.stack([base + 0.3 * apart, base - 0.3 * apart]), dim=1)
    labels = torch.arange(2).repeat_interleave(50)  # (100,)
    feats = F.normalize(centres[labels] + 0.02 * torch.randn(100, 16, generator=g), dim=1)
    assert (feats[1::2] @ feats[::2].T).min() > 0.6  # every neighbour's vote overflowed
    assert s3l.knn_top1(feats[::2], labels[::2], feats[1::2], labels[1::2], k=50, t=t) == 100.0


# ----- the run folder's lock: a full disk, an empty lock ------------------------------------------

def test_a_full_disk_when_taking_the_lock_ends_in_one_line_with_no_lock_left(tmp_path,
                                                                             monkeypatch):
    def no_space(fd, b):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(runs.os, "write", no_space)
        with pytest.raises(SystemExit) as e:
            runs.lock_run_folder(str(tmp_path / "run"))
    assert "cannot write" in str(e.value) and "No space left on device" in str(e.value)
    assert "--save-dir" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / runs.LOCK_NAME).exists()


def test_an_empty_lock_is_taken_over_once_old_and_refused_by_name_while_new(tmp_path, capsys):
    """An empty .lock (its writer found the disk full, or died before writing its pid) is no run:
    the next run takes it over with a line; one just created belongs to a run that is starting."""
    lock = tmp_path / runs.LOCK_NAME
    lock.write_text("")
    with pytest.raises(SystemExit, match="in use by a run that is starting"):
        runs.lock_run_folder(str(tmp_path))
    os.utime(lock, (time.time() - 60, time.time() - 60))
    runs.lock_run_folder(str(tmp_path))
    assert "an empty lock" in capsys.readouterr().out
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}"
    runs.unlock_run_folder(str(tmp_path))


# ----- decoding: interrupted, damaged cache entries, files that are not regular -------------------

def cache_files(cache):
    return sorted(os.listdir(cache))


def test_an_interrupted_decode_leaves_no_temporary_file_and_stale_ones_are_removed(tmp_path,
                                                                                   monkeypatch):
    root = make_folder(tmp_path / "data", classes=2, per_class=4)
    listing, cache = data.list_split(root, "train"), str(tmp_path / "cache")
    calls = []
    real = decode._decode_or_error

    def interrupted(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(job)
    monkeypatch.setattr(decode, "_decode_or_error", interrupted)
    with pytest.raises(SystemExit, match="interrupted while decoding data-train: nothing was "
                                         "cached"):
        try:
            decode.load_split(listing, 16, cache, workers=1)
        except KeyboardInterrupt:  # left as it is, it would stop pytest itself
            pytest.fail("Ctrl-C while decoding came out as a KeyboardInterrupt traceback")
    assert cache_files(cache) == []
    monkeypatch.setattr(decode, "_decode_or_error", real)
    host = socket.gethostname().replace(".", "_")
    stale = [f"train-x.{host}-{dead_pid()}.tmp.npy", f"train-x.{dead_pid()}.tmp.npy",
             f"train-x.{host}-{dead_pid()}.json.tmp"]
    kept = [f"train-x.{host}-{os.getpid()}.tmp.npy",  # a decode of a live process
            f"train-x.otherhost-{dead_pid()}.tmp.npy"]  # another host's: its pid means nothing
    for name in stale + kept:
        (tmp_path / "cache" / name).write_bytes(b"\0" * 1000)
    decode.load_split(listing, 16, cache, workers=1, log=lambda *a: None)
    assert not set(stale) & set(cache_files(cache)) and set(kept) <= set(cache_files(cache))


def test_ctrl_c_while_decoding_with_workers_prints_one_line_and_leaves_nothing(tmp_path):
    """Ctrl-C reaches the main process and its decode workers (one process group): one line, no
    traceback from any of them, exit status 1, no temporary file in the cache."""
    root = make_folder(tmp_path / "data", classes=2, per_class=40, size=(8, 8))
    script = textwrap.dedent(f"""
        import time, data, decode
        real = decode.decode_image
        def slow(*a, **k):
            time.sleep(0.1)
            return real(*a, **k)
        decode.decode_image = slow
        print("start", flush=True)
        decode.load_split(data.list_split({root!r}, "train"), 8, {str(tmp_path / "cache")!r},
                          workers=2)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], cwd=HERE, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert child.stdout.readline().strip() == "start"
    time.sleep(2.0)  # 80 images at 0.1 s on 2 workers: about 4 s of decoding
    os.killpg(child.pid, signal.SIGINT)
    out = child.communicate(timeout=60)[0]
    assert child.returncode == 1, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "interrupted while decoding data-train: nothing was cached" in out
    assert cache_files(tmp_path / "cache") == []


@pytest.mark.parametrize("damage", ["empty", "garbage"])
def test_a_damaged_cache_entry_is_named_and_decoded_again(tmp_path, damage):
    """A zero-byte .npy (a power loss after an unsynced rename) or other bytes of the same size
    (a bad disk): the entry is named in one line, removed and decoded again, never used."""
    root = make_folder(tmp_path / "data", classes=2, per_class=4)
    listing, cache = data.list_split(root, "train"), str(tmp_path / "cache")
    first = np.array(decode.load_split(listing, 16, cache, workers=1, log=lambda *a: None)[0])
    npy = next(tmp_path.glob("cache/*.npy"))
    if damage == "empty":
        npy.write_bytes(b"")
    else:
        raw = bytearray(npy.read_bytes())
        raw[-500:-400] = bytes(100)  # zeros inside the last image
        npy.write_bytes(bytes(raw))
    lines = []
    again = np.array(decode.load_split(listing, 16, cache, workers=1, log=lines.append)[0])
    assert np.array_equal(again, first)
    damaged = [line for line in lines if "is damaged" in line]
    assert len(damaged) == 1 and str(npy) in damaged[0] and "decoding again" in damaged[0]
    assert any("decoded 8 images" in line for line in lines)


def test_a_named_pipe_or_other_non_regular_file_is_skipped_and_listed(tmp_path):
    """`pipe.jpg`, a FIFO in a class folder, would block the decoder forever: it is skipped with
    its reason, like any unreadable file, and the run goes on."""
    root = make_folder(tmp_path / "data", classes=2, per_class=4)
    os.mkfifo(tmp_path / "data" / "train" / "class0" / "pipe.jpg")
    def hang(signum, frame):
        raise TimeoutError("the decoder blocked on the named pipe")
    previous = signal.signal(signal.SIGALRM, hang)  # a hang fails this test, not the suite
    signal.alarm(20)
    try:
        store = data.load_store(root, "train", 16, cache_dir=str(tmp_path / "cache"),
                                device=torch.device("cpu"), workers=1)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert len(store) == 8 and store.skipped == [str(tmp_path / "data/train/class0/pipe.jpg")]
    skipped = json.load(open(next(tmp_path.glob("cache/*.json"))))["skipped"]
    assert "not a regular file (a named pipe)" in skipped[0][1]


def test_an_interrupted_export_leaves_no_temporary_file_and_stale_ones_are_removed(tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "backbone.pt"
    (tmp_path / f"backbone.pt.{dead_pid()}.tmp").write_bytes(b"half an export")

    def interrupted(obj, f):
        open(f, "wb").write(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(runs.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(str(out), {"w": torch.zeros(2)})
    assert os.listdir(tmp_path) == []


def test_export_to_a_folder_says_to_name_a_file(tmp_path):
    with pytest.raises(SystemExit, match="is a folder; pass the file to write"):
        checkpoints.export_backbone(str(tmp_path / "missing.pt"), str(tmp_path))


# ----- rough edges: flags, labels, subsets, exports, progress lines -------------------------------

def test_a_seed_out_of_range_is_refused_by_the_parser_naming_it_and_creating_nothing(tmp_path,
                                                                                    capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["pretrain", "--seed", "99999999999999999999", "--save-dir",
                    str(tmp_path / "run")])
    assert e.value.code == 2 and "--seed: must be [0, 4294967295]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_evaluations_refuse_one_class_and_name_missing_labels_before_a_missing_split(tmp_path):
    one = make_folder(tmp_path / "one", classes=1, per_class=4)
    make_folder(tmp_path / "one", classes=1, per_class=2, split="test")
    flat = tmp_path / "flat"
    for i in range(4):
        write_image(str(flat / f"img{i}.png"), seed=i)
    cache = ["--cache-dir", str(tmp_path / "cache"), "--input-size", "16", "--arch", "resnet18"]
    with pytest.raises(SystemExit, match="linear needs at least 2 classes to tell apart; .* has 1"):
        train.main(["linear", "--data", one, "--save-dir", str(tmp_path / "a"), *cache])
    with pytest.raises(SystemExit, match="knn needs labels, and the train split of .* is a folder "
                                         "of unlabeled images"):
        train.main(["knn", "--data", str(flat), "--save-dir", str(tmp_path / "b"), *cache])


def test_a_subset_decodes_only_the_images_it_chose(tmp_path, capsys):
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    store = data.load_train_store(root, "train", 16, subset="per-class=2", seed=0,
                                  save_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                                  device=torch.device("cpu"), workers=1)
    cached = json.load(open(next(tmp_path.glob("cache/*.json"))))
    assert len(store) == 4 and len(cached["kept"]) == 4  # 4 decoded, not the split's 16
    assert (tmp_path / "subset.txt").read_text().split() == store.paths
    assert store.labels.tolist().count(0) == 2
    assert "--subset per-class=2: 4 of the 16 files" in capsys.readouterr().out


def test_an_export_carries_its_resolution_and_knn_evaluates_at_it(tmp_path):
    """A plain state_dict holds tensors only: the export's sidecar JSON says the resolution it was
    trained at, so `knn --pretrained backbone.pt` runs at 16 px here, not at 224."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    make_folder(tmp_path / "data", classes=2, per_class=2, split="test")
    cache = ["--cache-dir", str(tmp_path / "cache")]
    train.main(tiny_pretrain(root, "--epochs", "1", "--save-dir", str(tmp_path / "pre"), *cache))
    train.main(["export", str(tmp_path / "pre" / "checkpoint.pt"), str(tmp_path / "bb.pt")])
    assert json.load(open(tmp_path / "bb.json"))["input_size"] == 16
    record = train.knn(cli.parse_args(["knn", "--data", root, "--pretrained",
                                         str(tmp_path / "bb.pt"), "--save-dir",
                                         str(tmp_path / "knn"), *cache]))
    assert record["input_size"] == 16


def test_progress_in_a_file_is_one_line_each_and_an_epochs_line_is_short(tmp_path, capsys):
    """Piped to a file, no line is overwritten with \\r (it would run an epoch's lines together),
    and the end-of-epoch line shows the loss, the pace and the rank (log.jsonl has the rest)."""
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    train.main(tiny_pretrain(root, "--epochs", "2", "--save-dir", str(tmp_path / "run"),
                             "--cache-dir", str(tmp_path / "cache")))
    out = capsys.readouterr().out
    assert "\r" not in out
    epoch_lines = [line for line in out.splitlines() if line.startswith("epoch 2 ")]
    assert len(epoch_lines) == 1 and "rank" in epoch_lines[0] and "loss" in epoch_lines[0]
    assert "uniform" not in epoch_lines[0] and "cos_neg" not in epoch_lines[0]
    assert "uniform" in json.loads(open(tmp_path / "run" / "log.jsonl").readlines()[1])


def test_the_eta_comes_from_the_pace_of_the_whole_run(capsys, monkeypatch):
    """Epoch 3 of 4 whose first step took 10 s, after 2 epochs of 100 images in 20 s: the eta is
    from 110 images in 30 s (a 3.7 img/s pace) for the 190 left, not from this step's 1 img/s."""
    clock = iter([1000.0, 1010.0, 1010.0])
    monkeypatch.setattr(runs.time, "time", lambda: next(clock))
    meter = runs.EpochMeter(2, 4, 10, 10, 100, 1, torch.device("cpu"), pace=(100, 20.0))
    meter.add(0, torch.tensor(1.0), 0.1)
    eta = float(capsys.readouterr().out.split("eta ")[1].split(" min")[0])
    assert eta == pytest.approx(190 / (110 / 30) / 60, abs=0.05)


def test_simclrs_collapse_causes_say_the_lr_was_set_for_batch_512(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    seen = []
    real = train.health.HealthMonitor

    def capture(*a):
        seen.append(a[-1])
        return real(*a)
    monkeypatch.setattr(train.health, "HealthMonitor", capture)
    argv = tiny_pretrain(root, "--epochs", "1", "--save-dir", str(tmp_path / "run"),
                         "--cache-dir", str(tmp_path / "cache"))
    argv[argv.index("--moco-k"):argv.index("--moco-k") + 2] = ["--method", "simclr"]
    train.main(argv)
    assert "--lr 0.5 (too high or too low, the method's default, set for batch 512)" in seen[0]


def test_a_huge_photo_is_reduced_first_keeps_its_orientation_and_warns_nothing(tmp_path,
                                                                               monkeypatch):
    """A photo over 8x the store's side is box-reduced before any copy (bounded memory), close to
    resizing it whole; its EXIF orientation still applies; Pillow's decompression-bomb warning
    (beyond Image.MAX_IMAGE_PIXELS, here lowered to 20,000) is not printed raw."""
    from PIL import Image
    import warnings
    y, x = np.mgrid[0:160, 0:200]
    arr = np.stack([x * 255 // 199, y * 255 // 159, (x + y) % 256], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 160 wide, 200 high
    Image.fromarray(arr).save(tmp_path / "big.png", exif=exif)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        small = decode.decode_image(str(tmp_path / "big.png"), 8)  # factor 160 // 32 = 5
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    upright = Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270)
    whole = np.asarray(upright.resize((8, 10), Image.BILINEAR)).transpose(2, 0, 1)
    assert small.shape == (3, 10, 8)  # 8 x 10 after the orientation, short side 8
    assert np.abs(small.astype(int) - whole.astype(int)).max() <= 8


def test_a_fine_tuning_far_above_chance_in_its_first_epoch_is_warned_about(tmp_path, capsys):
    """The default job's README follow-up at the paper's lr 0.1 began at loss 7.0 for 10 classes
    (chance: ln 10 = 2.3) and ended at chance: a first epoch above 2x chance says to lower --lr."""
    for loss, warned in ((7.0, True), (2.2, False)):
        log = runs.RunLog(str(tmp_path), {}, writes=False, chance=np.log(10))
        log.check({"epoch": 1, "loss": loss})
        assert ("is 3.0x the loss at chance" in capsys.readouterr().out) == warned
