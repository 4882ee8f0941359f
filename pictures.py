"""Pictures of a run, Pillow only: views.png, a few training images as stored beside the two views
the first step receives (enlarged without smoothing: S3L's small resolution stays visible), and
neighbours.png, the kNN evaluation's top-k for a few seeded queries, each neighbour framed green
(same class) or red. health.py draws the run's curves, study.py the study's plots.
"""
import textwrap

import torch
from PIL import Image, ImageDraw

import s3l

CELL = 96  # px of one picture cell
GREEN, RED, GREY = (40, 160, 60), (200, 40, 40), (90, 90, 90)


def to_image(x: torch.Tensor, size=None, mean=None, std=None) -> Image.Image:
    """x: (3, H, W), uint8 or float in [0, 1] (or normalised, with mean and std) -> a PIL image;
    size (h, w): the part of a canvas that is the image (a store keeps it at the top-left)."""
    x = x.detach().float().cpu()
    if size is not None:
        x = x[:, :int(size[0]), :int(size[1])]
    if mean is not None:
        x = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    if x.max() > 1.5:  # uint8 values
        x = x / 255
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def cell(im: Image.Image, smooth: bool) -> Image.Image:
    """The image fitted into a CELL x CELL square, its aspect ratio kept; enlarged by whole pixels
    without smoothing (smooth=False: a view's own pixels stay visible), or resampled (photos)."""
    w, h = im.size
    scale = CELL / max(w, h)
    if not smooth and scale >= 1:
        scale = max(1, int(scale))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    im = im.resize(size, Image.NEAREST if not smooth else Image.BILINEAR)
    out = Image.new("RGB", (CELL, CELL), "white")
    out.paste(im, ((CELL - size[0]) // 2, (CELL - size[1]) // 2))
    return out


def framed(im: Image.Image, colour, width: int = 4) -> Image.Image:
    ImageDraw.Draw(im).rectangle([0, 0, im.width - 1, im.height - 1], outline=colour,
                                 width=width)
    return im


def caption_strip(text: str, width: int) -> Image.Image:
    """The text in lines that fit `width` (Pillow's default font: about 6 px a character)."""
    lines = textwrap.wrap(text, max(8, (width - 8) // 6))
    strip = Image.new("RGB", (width, 6 + 12 * len(lines)), "white")
    ImageDraw.Draw(strip).multiline_text((4, 3), "\n".join(lines), fill=(0, 0, 0), spacing=2)
    return strip


def draw_views(path: str, images: torch.Tensor, sizes: torch.Tensor, view1: torch.Tensor,
               view2: torch.Tensor, caption: str, mean, std) -> Image.Image:
    """views.png: one row an image, as stored, then its two views as the step receives them.

    images: (k, 3, L, L) uint8 canvases, sizes: (k, 2) = (h, w); view1, view2: (k, 3, S, S),
    normalised with mean and std. The picture is 3 x k cells under the caption and the columns'
    names."""
    k, top = images.shape[0], caption_strip(caption, 3 * CELL)
    head = top.height + 14  # the caption, then the columns' names
    grid = Image.new("RGB", (3 * CELL, head + (CELL + 4) * k), "white")
    grid.paste(top, (0, 0))
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(("as stored", "view 1", "view 2")):
        draw.text((j * CELL + 4, top.height), name, fill=GREY)
    for i in range(k):
        row = [cell(to_image(images[i], sizes[i]), smooth=True)]
        row += [cell(to_image(v[i], mean=mean, std=std), smooth=False) for v in (view1, view2)]
        for j, im in enumerate(row):
            grid.paste(im, (j * CELL, head + i * (CELL + 4)))
    grid.save(path)
    return grid


def draw_neighbours(queries, neighbours, same, labels: list, title: str) -> Image.Image:
    """One panel of neighbours.png: a row a query (its class written under it), then its k
    nearest memory images in order, framed green when of the query's class, red when not.

    queries: list of PIL images; neighbours: list of lists of PIL images; same: list of lists of
    bools; labels: the queries' class names. Stack panels with stack()."""
    k = len(neighbours[0])
    top = caption_strip(title, (k + 1) * CELL + 8)
    panel = Image.new("RGB", (top.width, top.height + len(queries) * (CELL + 14)), "white")
    panel.paste(top, (0, 0))
    draw = ImageDraw.Draw(panel)
    for i, (query, row, marks) in enumerate(zip(queries, neighbours, same)):
        y = top.height + i * (CELL + 14)
        panel.paste(framed(cell(query, smooth=False), GREY), (0, y))
        draw.text((4, y + CELL), str(labels[i])[:16], fill=(0, 0, 0))
        for j, (im, ok) in enumerate(zip(row, marks)):
            panel.paste(framed(cell(im, smooth=False), GREEN if ok else RED),
                        (8 + (j + 1) * CELL, y))
    return panel


def stack(panels: list) -> Image.Image:
    """Panels one above the other, on white."""
    out = Image.new("RGB", (max(p.width for p in panels), sum(p.height for p in panels)),
                    "white")
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height
    return out


def neighbours_panel(bank, queries, bank_feats, query_feats, title: str, k: int = 5, n: int = 6,
                     seed: int = 0):
    """n seeded queries of `queries` (a data.ImageStore), each with its k nearest images of `bank`
    (s3l.knn_neighbours on bank_feats (N, D) and query_feats (M, D): the kNN's own top-k), framed
    green where of the query's class: a panel of neighbours.png.
    Returns (panel, query indices (n,), neighbour indices (n, k))."""
    chosen = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed))[:n]
    _, idx = s3l.knn_neighbours(bank_feats, query_feats[chosen.to(query_feats.device)], k)
    idx, cpu = idx.cpu(), torch.device("cpu")
    q_images, q_sizes = queries.batch(chosen, cpu)
    q_labels = queries.labels_of(chosen).cpu()  # (n,)
    same = (bank.labels_of(idx.flatten()).cpu().view(idx.shape) == q_labels[:, None]).tolist()
    rows = []
    for row in idx:
        images, sizes = bank.batch(row, cpu)
        rows.append([to_image(x, s) for x, s in zip(images, sizes)])
    names = [queries.classes[c] if queries.classes else str(c) for c in q_labels.tolist()]
    panel = draw_neighbours([to_image(x, s) for x, s in zip(q_images, q_sizes)], rows, same,
                            names, title)
    return panel, chosen, idx
