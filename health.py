"""Is pretraining learning? Label-free health of a representation, measured in every run.

A contrastive run can look fine and learn nothing, and a user's own folder has no labels for the kNN
monitor. Every `--print-freq` steps train.py hands the step's own outputs (no extra forward pass;
each method's `outputs`: the backbone features of view 1 and both views' projections) to a
HealthMonitor, which measures, on the device:

  rank, rank_z   effective rank (RankMe, Garrido et al. 2023, arXiv 2210.02885): exp of the entropy
                 of the normalised singular values of the backbone features (N, d) and of the
                 projections (N, D); at most min(N, d): one batch cannot show more
                 (rank_share, rank_z_share: as a share of that bound)
  spread_z       per-dimension std of the L2-normalised projections x sqrt(D): about 1 when they
                 fill the sphere, 0 when every image maps to one point (the BYOL/SimSiam collapse
                 signal; Chen & He 2021, arXiv 2011.10566, Sec. 4.1, compare it with 1/sqrt(D))
  align, uniform alignment E||u - v||^2 of the two views and uniformity log E exp(-2 ||u - w||^2)
                 over pairs of images (Wang & Isola 2020, arXiv 2005.10242), u = z / ||z||:
                 0 and -4 at best (high D), 0 and 0 for a collapsed encoder
  cos_pos, cos_neg  mean cosine of the two views of an image, and of two different images
  chance         the loss of a guess: log(K + 1) for MoCo, c x log(2N - 1) for SimCLR (c: its
                 loss scale); BYOL has none, its `cos_pos` is the online-target cosine 1 - loss / 4

Each epoch's record holds the means over its measurements; the progress line shows `rank r/max
spread s` (the features' rank, the projections' spread). A run that collapses or sits at chance for
a whole epoch gets one warning saying what to try; it goes on. health.png draws a run's log;
`chart` and `nice_ticks` are the small pillow plotting that study.py uses as well.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


# ----- the measures (each a 0-d tensor on the device: nothing is read back here) -----------------

def effective_rank(x: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al. 2023, Eq. 1): exp(-sum_k p_k log p_k), p_k = s_k / sum(s) + eps, s
    the singular values of x: (N, D). D for a well-spread Gaussian batch (N >> D), r for rank r, 1
    for a constant; NaN if x is not finite."""
    finite = torch.isfinite(x).all()
    s = torch.linalg.svdvals(torch.nan_to_num(x.float(), 0.0, 0.0, 0.0))
    p = s / s.sum().clamp_min(1e-30) + eps
    rank = torch.exp(-(p * p.log()).sum())
    return torch.where(finite, rank, float("nan"))


def spread(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the std over the batch of the L2-normalised z: (N, D), times
    sqrt(D): near 1 for directions spread over the sphere, 0 for a collapse to one point."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean() * math.sqrt(z.shape[1])


def alignment(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Wang & Isola 2020, Eq. 4 with alpha = 2: E ||u1 - u2||^2 over the positive pairs (rows of
    z1, z2: (N, D)), u the L2-normalised rows. 0: the two views agree exactly; at most 4."""
    u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    return (u1 - u2).pow(2).sum(dim=1).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola 2020, Eq. 5: log E exp(-t ||u_i - u_j||^2) over the pairs i < j of z: (N, D),
    u the L2-normalised rows. 0 when all rows are equal; the lower, the more uniform."""
    u = F.normalize(z.float(), dim=1)
    return torch.pdist(u).pow(2).mul(-t).exp().mean().log()


def measure(outputs: dict) -> dict:
    """All measures of one step's outputs: features (N, d), z1 and z2 (N, D) (a method's
    `outputs`). Returns {name: 0-d tensor}; nothing is read back."""
    h, z1, z2 = outputs["features"], outputs["z1"], outputs["z2"]
    u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n = z1.shape[0]
    cos = u1 @ u2.T  # (N, N): the diagonal holds the positive pairs
    return dict(rank=effective_rank(h), rank_z=effective_rank(z1), spread_z=spread(z1),
                align=alignment(z1, z2), uniform=(uniformity(z1) + uniformity(z2)) / 2,
                cos_pos=cos.diagonal().mean(),
                cos_neg=(cos.sum() - cos.diagonal().sum()) / max(n * (n - 1), 1))


def chance_loss(method: str, batch: int, moco_k: int, loss_scale: float = 1.0):
    """The loss of a representation that tells no image from another (uniform logits): MoCo
    log(K + 1) (1 key against K queued); SimCLR log(2N - 1) x its loss scale (each of the 2N
    views against the 2N - 1 others, N: the images whose views are candidates); BYOL: None."""
    if method == "moco":
        return math.log(moco_k + 1)
    if method == "simclr":
        return loss_scale * math.log(2 * batch - 1)
    return None


# what a record holds; summary.json's "health": the last epoch's
KEYS = ("rank", "rank_z", "spread_z", "align", "uniform", "cos_pos", "cos_neg", "chance",
        "rank_max", "rank_z_max", "rank_share", "rank_z_share")


# ----- the monitor: per-epoch means, the progress figure, the collapse warning ------------------

# Thresholds, from README's "Is pretraining learning?" runs (CIFAR-10, ResNet-18, batch 128): BYOL
# without its predictor read spread_z 0.044 and rank_z 5.8 of 128 at its first measurement (step
# 5), epoch means 0.033, 0.025, 0.024; healthy runs' epoch means never went below 0.24 (MoCo v2's
# first epoch: an untrained network's projections point almost one way, other images' cosine 0.81)
# and SimCLR's sat at 0.82-0.96; a backbone whose features are equal for every image gives 0 and
# rank 1. A loss within 1 % of chance over a whole epoch after the first (which starts there) tells
# nothing apart: MoCo v2's first epoch was 3.9 % below chance.
COLLAPSE_SPREAD = 0.1  # spread_z below this: collapsed
COLLAPSE_RANK_SHARE = 0.02  # or rank_z below this share of min(N, D)
CHANCE_MARGIN = 0.01  # a loss within 1 % of chance: at chance


class HealthMonitor:
    """Collects the measures every `print_freq` steps of an epoch (the steps whose loss the progress
    line reads back, so no other step waits for the device) and warns once per run.

    method: "moco" | "simclr" | "byol"; chance: chance_loss() or None; steps: steps an epoch.
    causes: this run's settings to name in the warning (lr, tau, batch and BN groups, precision).
    """

    def __init__(self, method: str, chance, print_freq: int, steps: int, causes: str):
        self.method, self.chance, self.print_freq, self.steps = method, chance, print_freq, steps
        self.causes, self.warned, self.collapsed_since, self.sums = causes, False, None, {}

    def due(self, step: int) -> bool:
        return (step + 1) % self.print_freq == 0 or step + 1 == self.steps

    def observe(self, epoch: int, step: int, outputs: dict, loss: torch.Tensor) -> None:
        """At a due step (the loop asks): measure `outputs` (a method's), read the values back,
        add them to the epoch's sums, append `rank r/max spread s` to the progress line and note
        when a collapse began."""
        values = measure(outputs)
        if self.method == "byol":  # byol_loss = 2 - 2 cos for each of the two directions
            values["cos_pos"] = 1 - loss.detach().float() / 4
        values = dict(zip(values, torch.stack(list(values.values())).tolist()))
        for k, v in values.items():
            self.sums.setdefault(k, []).append(v)
        h, z = outputs["features"], outputs["z1"]
        self.rank_max = (min(h.shape), min(z.shape))
        print(f"rank {values['rank']:.0f}/{self.rank_max[0]} spread {values['spread_z']:.2f}   ",
              end="", flush=True)
        collapsed = values["spread_z"] < COLLAPSE_SPREAD or \
            values["rank_z"] < COLLAPSE_RANK_SHARE * self.rank_max[1]  # NaN: not collapsed
        if not collapsed:
            self.collapsed_since = None
        elif self.collapsed_since is None:
            self.collapsed_since = (epoch, step, values)

    def epoch_record(self, epoch: int, loss) -> dict:
        """The epoch's means (rounded, strict JSON: NaN becomes null in the log), plus chance and
        the rank bounds; prints the warning once when the run collapsed or sat at chance for the
        whole epoch. loss: the epoch's mean loss (None or NaN: not finite)."""
        record = {k: round(sum(v) / len(v), 4) for k, v in self.sums.items() if v}
        if not record:
            return {}
        record.update(rank_max=self.rank_max[0], rank_z_max=self.rank_max[1],  # min(N, d)
                      rank_share=round(record["rank"] / self.rank_max[0], 4),
                      rank_z_share=round(record["rank_z"] / self.rank_max[1], 4))
        if self.chance is not None:
            record["chance"] = round(self.chance, 4)
        self.sums = {}
        if not self.warned:
            seen = self.what_is_wrong(epoch, loss)
            if seen:
                self.warned = True
                print(f"\nwarning: {seen}. The run goes on. Likely causes: {self.causes}.")
        return record

    def what_is_wrong(self, epoch: int, loss) -> str:
        """The collapse (begun at or before this epoch's first measurement) or the chance loss
        (a whole epoch after the first) in words, or ''."""
        since = self.collapsed_since
        if since is not None and (since[0] < epoch or since[1] < self.print_freq):
            e, s, v = since
            return (f"the representation collapsed at epoch {e + 1} step {s + 1} and stayed so: "
                    f"projections' spread {v['spread_z']:.3f} (1 = spread over the sphere, "
                    f"< {COLLAPSE_SPREAD} collapsed), effective rank {v['rank_z']:.1f} of "
                    f"{self.rank_max[1]}")
        if self.chance is not None and epoch > 0 and loss is not None and \
                loss >= self.chance * (1 - CHANCE_MARGIN):
            return (f"the loss ({loss:.4g}) sat at chance ({self.chance:.4g}) for all of epoch "
                    f"{epoch + 1}: the views are not being told apart yet")
        return ""


# ----- plots with pillow ------------------------------------------------------------------------

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def nice_ticks(low: float, high: float, count: int = 5) -> list:
    """About `count` round tick values (1, 2 or 5 x a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)),
               key=lambda s: abs(s - raw))
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step)) + 1)]


def chart(series: list, xlabel: str, ylabel: str, title: str, x_from=None,
          size=(900, 520), legend: bool = True) -> Image.Image:
    """A chart with axes, ticks, axis labels, a title and a legend. series: dicts with label,
    x, y (lists), optional yerr (error bars) and lines (join the points; default: markers only);
    series with the same label share a colour and a legend entry (the seeds of one arm).
    x_from: where the x axis starts (0 for costs, so distances read as ratios; None: the data).
    size: (width, height) in px; legend=False leaves out the legend and its margin."""
    font = ImageFont.load_default(size=13)

    def text(xy, words, anchor="lt"):  # anchor as pillow's ("mt": middle, top), any font
        x0, y0, x1, y1 = draw.textbbox((0, 0), words, font=font)
        dx = {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[anchor[0]]
        dy = {"t": 0, "m": (y1 - y0) / 2, "b": y1 - y0}[anchor[1]]
        draw.text((xy[0] - dx - x0, xy[1] - dy - y0), words, fill="black", font=font)

    labels = list(dict.fromkeys(s["label"] for s in series))  # one colour and legend entry each
    (w, h), left, top, bottom = size, 80, 40, 60
    right = min(240, w // 5) if legend else 20
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    xs = [x for s in series for x in s["x"]] + ([] if x_from is None else [x_from])
    ys = [y + sign * e for s in series for y, e in zip(s["y"], s.get("yerr") or [0] * len(s["y"]))
          for sign in (-1, 1)] or [0]
    xt, yt = nice_ticks(min(xs, default=0), max(xs, default=1)), nice_ticks(min(ys), max(ys))

    def px(x, y):  # data -> pixel coordinates of the plot area
        return (left + (x - xt[0]) / (xt[-1] - xt[0]) * (w - left - right),
                h - bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (h - top - bottom))

    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for x in xt:
        draw.line([px(x, yt[0]), (px(x, yt[0])[0], h - bottom + 5)], fill="black")
        text((px(x, yt[0])[0], h - bottom + 8), f"{x:g}", "mt")
    for y in yt:
        draw.line([(left - 5, px(xt[0], y)[1]), px(xt[0], y)], fill="black")
        text((left - 8, px(xt[0], y)[1]), f"{y:g}", "rm")
    text(((left + w - right) / 2, h - 20), xlabel, "mm")
    text(((left + w - right) / 2, 20), title, "mm")
    x0, y0, x1, y1 = draw.textbbox((0, 0), ylabel, font=font)
    label = Image.new("RGB", (x1 - x0 + 4, y1 - y0 + 4), "white")  # drawn flat, then turned
    ImageDraw.Draw(label).text((2 - x0, 2 - y0), ylabel, fill="black", font=font)
    img.paste(label.rotate(90, expand=True), (8, int((top + h - bottom) / 2 - label.width / 2)))
    for s in series:
        colour = COLOURS[labels.index(s["label"]) % len(COLOURS)]
        points = [px(x, y) for x, y in zip(s["x"], s["y"])]
        if s.get("lines") and len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for (x, y), e in zip(points, s.get("yerr") or [0] * len(points)):
            bar = e / (yt[-1] - yt[0]) * (h - top - bottom)
            draw.line([(x, y - bar), (x, y + bar)], fill=colour, width=2)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
    for i, label in enumerate(labels if legend else []):
        ly = top + 10 + 18 * i
        draw.rectangle([w - right + 15, ly - 5, w - right + 25, ly + 5],
                       fill=COLOURS[i % len(COLOURS)])
        text((w - right + 32, ly), label, "lm")
    return img


def draw(folder: str) -> str:
    """health.png of a pretraining run folder, from its log.jsonl: the loss (and chance), the
    effective ranks, the spread, uniformity and alignment, and the kNN monitor where present,
    against epochs, four panels. Returns the path."""
    with open(os.path.join(folder, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]

    def series(*keys):
        return [dict(label=key, x=[r["epoch"] for r in log if r.get(key) is not None],
                     y=[r[key] for r in log if r.get(key) is not None], lines=True)
                for key in keys if any(r.get(key) is not None for r in log)]

    panels = [(series("loss", "chance"), "loss", "the loss, and chance's"),
              (series("rank", "rank_z"), "effective rank", "features' (rank), projections'"),
              (series("spread_z", "uniform", "align"), "", "spread (0: collapsed), uniformity "
               "(-4 best), alignment"),
              (series("knn_top1"), "top-1 (%)", "kNN monitor (labels)")]
    img = Image.new("RGB", (1200, 800), "white")
    for i, (data, ylabel, title) in enumerate(panels):
        if data:
            img.paste(chart(data, "epoch", ylabel, title, x_from=0, size=(600, 400)),
                      (600 * (i % 2), 400 * (i // 2)))
    path = os.path.join(folder, "health.png")
    img.save(path)
    return path
