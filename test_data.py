"""Specifications of data.py: readers, decoding every image mode, the decode cache, the store, the
built-in shapes, tiny generated folders.

Run: python -m pytest -q
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import decode

from conftest import make_folder, write_image


# ----- data.py: readers, decoding, cache, bad input -----------------------------------------------

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
    out = {name: decode.decode_image(str(tmp_path / name), 16) for name in
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
    out = decode.decode_image(str(tmp_path / "rot.jpg"), 10)  # displayed 10 x 20, centre 13 rows
    assert out.shape == (3, 13, 10)
    assert out[:, :6].mean() > 200 and out[:, 8:].mean() < 50  # white on top, not on the left


def test_decode_keeps_the_aspect_ratio_up_to_the_cap_and_never_upscales(tmp_path):
    """decode_image: shorter side -> short_side (PIL's antialiased resize), longer side
    centre-cropped to at most round(short x max_aspect); max_aspect 1 is the centre square; a photo
    smaller than short_side keeps its own pixels."""
    paths = {(w, h): write_image(str(tmp_path / f"{w}x{h}.png"), (w, h)) for w, h in
             [(80, 60), (60, 80), (100, 40), (24, 20)]}
    assert decode.decode_image(paths[80, 60], 30).shape == (3, 30, 40)  # 4:3 whole
    assert decode.decode_image(paths[60, 80], 30).shape == (3, 40, 30)  # portrait whole
    assert decode.decode_image(paths[100, 40], 20).shape == (3, 20, 27)  # 5:2 cut to 4:3
    assert decode.decode_image(paths[60, 80], 30, max_aspect=1).shape == (3, 30, 30)
    source = np.asarray(Image.open(paths[80, 60])).transpose(2, 0, 1)
    centre = decode.decode_image(paths[80, 60], 60, max_aspect=1.25)  # 60 x 75 of 60 x 80
    assert np.array_equal(centre, source[:, :, 2:77])
    small = decode.decode_image(paths[24, 20], 64)  # capped at the source's short side
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
        images, got, _ = decode.load_split(listing, short_side, cache, max_aspect=max_aspect)
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
    images, sizes, kept = decode.load_split(listing, 16, str(tmp_path / "cache"))
    assert len(kept) == 3 and images.shape == (3, 3, 19, 19)  # 24 x 20 photos -> 19 x 16
    assert sizes.tolist() == [[16, 19]] * 3
    assert "skipped 2 unreadable of 5" in capsys.readouterr().out


def test_disk_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, capsys):
    root = make_folder(tmp_path, classes=1, per_class=3)
    cache = str(tmp_path / "cache")
    first, sizes, _ = decode.load_split(data.list_split(root, "train"), 16, cache)
    assert "decoded 3 images" in capsys.readouterr().out
    again, sizes_again, _ = decode.load_split(data.list_split(root, "train"), 16, cache)
    assert "from cache" in capsys.readouterr().out and np.array_equal(first, again)
    assert np.array_equal(sizes, sizes_again) and sizes.dtype == np.int64
    path = data.list_split(root, "train").paths[0]
    Image.new("RGB", (24, 20), (7, 7, 7)).save(path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    changed, _, _ = decode.load_split(data.list_split(root, "train"), 16, cache)
    assert "decoded 3 images" in capsys.readouterr().out
    assert (changed[0, :, :16, :19] == 7).all() and not np.array_equal(changed, first)


def test_store_gathers_batches_from_memory_and_from_the_memmap_alike(tmp_path, capsys):
    root = make_folder(tmp_path, classes=2, per_class=4)
    listing = data.list_split(root, "train")
    images, sizes, _ = decode.load_split(listing, 16, str(tmp_path / "cache"))
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
