"""Specifications of the pictures a run draws (pictures.py): views.png shows the views the first
step really receives, the same for a resumed run; neighbours.png shows the kNN's own top-k.

Run: python -m pytest -q
"""
import os
import shutil

import torch
import torch.nn.functional as F
from PIL import Image

import cli
import data
import pictures
import train

from conftest import make_folder, pretrain_argv


def test_views_png_shows_the_views_the_first_step_receives_and_a_resume_draws_the_same(
        tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    stepped, drawn = [], []
    real_step, real_draw = train.pretrain_step, pictures.draw_views

    def step(model, state, runtime, view1, view2):
        stepped.append((view1.clone(), view2.clone()))
        return real_step(model, state, runtime, view1, view2)

    def draw(path, images, sizes, view1, view2, *a):
        drawn.append((view1.clone(), view2.clone()))
        return real_draw(path, images, sizes, view1, view2, *a)
    monkeypatch.setattr(train, "pretrain_step", step)
    monkeypatch.setattr(pictures, "draw_views", draw)
    train.main(pretrain_argv(root, tmp_path / "a", "--save-every", "1"))
    (d1, d2), (s1, s2) = drawn[0], stepped[0]
    assert d1.shape[0] == 6 and torch.equal(d1, s1[:6]) and torch.equal(d2, s2[:6])
    png = Image.open(tmp_path / "a" / "views.png")
    png.load()
    assert png.width == 3 * pictures.CELL and png.height - 6 * (pictures.CELL + 4) in range(30, 90)
    # resumed after epoch 1 into a folder of its own: the same picture, drawn again
    shutil.copy(tmp_path / "a" / "checkpoint_0001.pt", tmp_path / "epoch1.pt")
    train.main(pretrain_argv(root, tmp_path / "b", "--save-every", "1", "--resume",
                             str(tmp_path / "epoch1.pt")))
    drawn_again = (tmp_path / "b" / "views.png").read_bytes()
    assert drawn_again == (tmp_path / "a" / "views.png").read_bytes()


def test_neighbours_are_the_knns_own_top_k_in_order_framed_by_class():
    """neighbours_panel draws, for seeded queries, s3l.knn_neighbours' top-k: the indices of a
    plain argsort of the cosines, nearest first."""
    bank, queries = data.synthetic_store(40, 20, 0), data.synthetic_store(12, 20, 1)
    g = torch.Generator().manual_seed(0)
    bank_feats = F.normalize(torch.randn(40, 16, generator=g), dim=1)
    query_feats = F.normalize(torch.randn(12, 16, generator=g), dim=1)
    panel, chosen, idx = pictures.neighbours_panel(bank, queries, bank_feats, query_feats, "t", k=5,
                                                n=4)
    oracle = torch.argsort(query_feats[chosen] @ bank_feats.T, dim=1, descending=True)[:, :5]
    assert idx.shape == (4, 5) and torch.equal(idx, oracle)
    assert panel.width == 6 * pictures.CELL + 8 and panel.height > 4 * pictures.CELL
    again = pictures.neighbours_panel(bank, queries, bank_feats, query_feats, "t", k=5, n=4)
    assert torch.equal(again[1], chosen)  # seeded queries


def test_knn_writes_neighbours_png_beside_its_results(tmp_path):
    root = make_folder(tmp_path / "data", classes=2, per_class=8)
    make_folder(tmp_path / "data", classes=2, per_class=4, split="test")
    train.knn(cli.parse_args(["knn", "--data", root, "--arch", "resnet18", "--input-size", "16",
                              "--save-dir", str(tmp_path / "knn"), "--cache-dir",
                              str(tmp_path / "cache")]))
    png = Image.open(tmp_path / "knn" / "neighbours.png")
    png.load()
    assert png.width == 6 * pictures.CELL + 8 and os.path.exists(tmp_path / "knn" / "summary.json")
