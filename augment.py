"""The batched augmentation of S3L, on the device, one random draw per image: torch only.

S3L (Cao & Wu 2021, arXiv 2103.13559) uses MoCo v2's `--aug-plus` views for every method, made per
image by torchvision 0.7 in DataLoader workers. Here a whole batch is augmented at once with the
same semantics: crops anywhere in the photo, resampled with PIL's antialiased bilinear filter
(crop_resize), then colour jitter in a random order, grey, blur, flip (SSLAugment). The fine-tuning
and test views (Resize(input x 8/7) -> RandomCrop + flip, or CenterCrop) are made the same way.

A batch is uint8 (or float in [0, 1]) (N, 3, L, L), each image at the top-left of its L x L canvas,
with sizes (N, 2) = (h, w); views are resampled from each image's own extent, never from the canvas
padding. Copy this file alone: it imports only torch and the standard library.

  pipelines  SSLAugment (two views for pretraining), finetune_train_params, finetune_train_view,
             center_view
  pieces     random_resized_crop_boxes, crop_boxes, resize_weights, crop_resize,
             color_jitter_params, color_jitter, grayscale, gaussian_blur, solarize, normalize,
             constant (the pieces' numbers, on the device once)
"""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 8 / 7  # fine-tune/test Resize(input x 8/7) before the crop: 256 for 224, 128 for 112


@functools.lru_cache(maxsize=None)
def constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of Python numbers (never written to), made once per device and dtype: on a GPU,
    torch.tensor(list, device=...) copies from pageable host memory and waits for every queued
    kernel, so a step's views that built one would hold the host back each step."""
    return torch.tensor(values, device=device, dtype=dtype)


@dataclass
class SSLAugment:
    """MoCo v2's `--aug-plus` pipeline, which the S3L code uses for every method.

    RandomResizedCrop(scale 0.2-1) of each whole photo -> p 0.8 ColorJitter(0.4, 0.4, 0.4, 0.1)
    -> p 0.2 grayscale -> p 0.5 blur sigma U[0.1, 2] px -> flip -> normalise; solarize_p > 0 adds
    BYOL's solarisation after the blur. The flip is folded into the crop (it commutes with every
    later op). __call__(x, sizes, generator): x (N, 3, L, L) uint8 (or float in [0, 1]), sizes
    (N, 2) = (h, w) -> one view (N, 3, input_size, input_size), float32. sample() draws every
    image's parameters; apply() is a pure function of x and them, so it compiles into one graph
    (torch.compile cannot trace a torch.Generator). resample_dtype: crop_resize's matmuls.
    """
    input_size: int
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple = (0.1, 2.0)  # pixels
    blur_p: float = 0.5
    solarize_p: float = 0.0
    flip_p: float = 0.5
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    resample_dtype: torch.dtype = torch.float32

    def sample(self, sizes: torch.Tensor, generator: torch.Generator) -> dict:
        """Every random parameter of one view of each image (sizes (N, 2) = (h, w)), each image
        its own, drawn from `generator`."""
        n = sizes.shape[0]

        def coin(p):
            return uniform(n, 0, 1, generator) < p
        blur = coin(self.blur_p)
        return dict(sizes=sizes,
                    boxes=random_resized_crop_boxes(sizes, self.scale, self.ratio, generator),
                    flip=coin(self.flip_p),
                    jitter=color_jitter_params(n, *self.jitter, self.jitter_p, generator),
                    gray=coin(self.grayscale_p),
                    sigma=torch.where(blur, uniform(n, *self.blur_sigma, generator), 0.0),
                    solarize=coin(self.solarize_p))

    def apply(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        x = crop_resize(x, params["sizes"], params["boxes"], self.input_size, params["flip"],
                        self.resample_dtype)
        x = color_jitter(x, *params["jitter"])
        x = grayscale(x, params["gray"])
        x = gaussian_blur(x, params["sigma"], radius=max(1, math.ceil(3 * self.blur_sigma[1])))
        if self.solarize_p > 0:
            x = solarize(x, params["solarize"])
        return normalize(x, self.mean, self.std)

    def __call__(self, x: torch.Tensor, sizes: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(sizes, generator))


def uniform(n, low, high, generator):
    """U[low, high) of shape n, drawn from `generator` on its own device."""
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def random_resized_crop_boxes(sizes: torch.Tensor, scale, ratio, generator) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, each image over its own (h, w).

    sizes: (N, 2) = (height, width) per image. Returns boxes (N, 4) = (top, left, h, w) in pixels.
    Up to 10 attempts per image: area ~ U(scale) x height x width, log-ratio ~ U(log ratio); the
    first attempt that fits wins; if none fits, the whole image, its ratio clamped to `ratio`,
    centred. So boxes reach every part of a non-square photo, its corners included.
    """
    attempts, n = 10, sizes.shape[0]
    height, width = sizes.to(generator.device, torch.float32).unbind(1)  # (N,) each
    area = (height * width).view(n, 1) * uniform((n, attempts), scale[0], scale[1], generator)
    log_r = uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))  # (N, attempts)
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (h > 0) & (w <= width.view(n, 1)) & (h <= height.view(n, 1))
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # index of the first fitting attempt
    w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
    found = ok.any(dim=1)
    # fallback (torchvision): whole image, ratio clamped into [min(ratio), max(ratio)], centred
    in_ratio = width / height
    fw = torch.where(in_ratio > max(ratio), torch.round(height * max(ratio)), width)
    fh = torch.where(in_ratio < min(ratio), torch.round(width / min(ratio)), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    # integer offsets uniform in [0, height - h] and [0, width - w], as random.randint
    top = torch.floor(uniform(n, 0, 1, generator) * (height - h + 1))
    left = torch.floor(uniform(n, 0, 1, generator) * (width - w + 1))
    top = torch.where(found, top, torch.div(height - h, 2, rounding_mode="floor"))
    left = torch.where(found, left, torch.div(width - w, 2, rounding_mode="floor"))
    return torch.stack([top, left, h, w], dim=1)


def crop_boxes(sizes: torch.Tensor, input_size: int, generator=None) -> torch.Tensor:
    """The fine-tune/test crop, Resize(round(input_size x 8/7)) then RandomCrop(input_size) (with a
    generator) or CenterCrop(input_size) (without), as boxes (N, 4) = (top, left, h, w) in the
    images' own pixels (torchvision 0.7: the resized long side is int(), the centre offset round()).

    sizes: (N, 2) = (h, w). Offsets range over the whole resized image, not a centre square. On
    each axis the box is input_size x (image px per resized px) long, so resampling it to
    input_size (crop_resize) equals Resize + crop, both through PIL's filter.
    """
    device = sizes.device if generator is None else generator.device
    sizes = sizes.to(device, torch.float32)
    resize = round(input_size * RESIZE_RATIO)
    short = sizes.min(dim=1, keepdim=True).values  # (N, 1)
    resized = torch.floor(resize * sizes / short)  # (N, 2): the short side becomes `resize`
    room = resized - input_size
    if generator is None:
        offsets = torch.round(room / 2)  # half to even, as Python's round()
    else:
        offsets = torch.floor(uniform(tuple(room.shape), 0, 1, generator) * (room + 1))
    per_resized_px = (sizes / resized).repeat(1, 2)  # (N, 4) image px per resized px, per axis
    return torch.cat([offsets, torch.full_like(offsets, input_size)], dim=1) * per_resized_px


def resize_weights(start: torch.Tensor, length: torch.Tensor, extent: torch.Tensor,
                   out_size: int, canvas: int) -> torch.Tensor:
    """PIL's antialiased bilinear resize of [start, start + length) to out_size pixels along one
    axis, as matrices (N, out_size, canvas) (Pillow's precompute_coeffs in Resample.c).

    start, length: (N,) box in pixels, fractions allowed; extent: (N,) each image's size on this
    axis (PIL clips taps to the image). Output pixel i is centred at start + (i + 0.5) x scale,
    scale = length / out_size; pixel j weighs max(0, 1 - |j + 0.5 - centre| / max(scale, 1)), a
    triangle widened by the downscale factor (antialiasing); rows are normalised to sum 1.
    """
    scale = (length / out_size).view(-1, 1, 1)  # (N, 1, 1) box pixels per output pixel
    i = torch.arange(out_size, device=start.device, dtype=start.dtype).view(1, -1, 1)
    centre = start.view(-1, 1, 1) + (i + 0.5) * scale  # (N, out, 1)
    j = torch.arange(canvas, device=start.device, dtype=start.dtype).view(1, 1, -1)
    weights = (1 - (j + 0.5 - centre).abs() / scale.clamp_min(1)).clamp_min(0)  # (N, out, L)
    weights = torch.where(j < extent.view(-1, 1, 1), weights, 0.0)
    return weights / weights.sum(dim=2, keepdim=True)


def crop_resize(x: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, out_size: int,
                flip=None, dtype=None) -> torch.Tensor:
    """Crop each image to its box and resize it to out_size x out_size, antialiased: two matmuls.

    x: (N, C, L, L) uint8 (ToTensor's /255 is applied to the output) or float in [0, 1], images at
    the top-left of their canvas; sizes: (N, 2) = (h, w); boxes: (N, 4) = (top, left, h, w) in
    pixels; flip: (N,) bool or None, a horizontal flip folded into the column weights (their rows
    reversed). Each view is Wy @ x @ Wx^T (Wy, Wx: resize_weights), which equals PIL's
    img.resize((out, out), BILINEAR, box=(left, top, left + w, top + h)), i.e. torchvision's
    RandomResizedCrop / Resize on the decoded photo, to float precision. Static shapes, no host
    sync. Returns float32 (N, C, out, out).
    dtype: of the matmuls (default float32). bfloat16 holds uint8 values exactly and rounds the
    weights to 3 significant digits: views within 2/255 of float32 (measured at 64 px: max 0.007,
    mean 0.001), the matmuls 2x faster on a CPU with AVX512-BF16 (61 -> 30 ms a view of 128).
    """
    # Cost: 2 N C out L (L + out) flops, the whole canvas whatever the boxes: 16 GFLOP, 180 ms on 2
    # CPU cores in float32 for 128 views at 112 px from a 376 px canvas (the unantialiased
    # grid_sample it replaced: 14 ms from a 128 px square). Its simple equivalent: PIL's
    # resize(box=) per image.
    n, _, canvas, _ = x.shape
    dtype = dtype or (x.dtype if x.is_floating_point() else torch.float32)
    boxes, sizes = boxes.to(x.device, torch.float32), sizes.to(x.device, torch.float32)
    top, left, h, w = boxes.unbind(1)
    wy = resize_weights(top, h, sizes[:, 0], out_size, canvas).to(dtype)  # (N, out, L)
    wx = resize_weights(left, w, sizes[:, 1], out_size, canvas).to(dtype)  # (N, out, L)
    if flip is not None:
        wx = torch.where(flip.to(x.device).view(n, 1, 1), wx.flip(1), wx)
    y = (x.to(dtype).flatten(1, 2) @ wx.transpose(1, 2)).view(n, -1, canvas, out_size)  # (N,C,L,o)
    y = (wy.unsqueeze(1) @ y).float()  # (N, C, out, out)
    return y if x.is_floating_point() else y.div_(255)


def _gray(x: torch.Tensor) -> torch.Tensor:
    # ITU-R 601-2 luma, as PIL's convert("L"): (N, 3, H, W) -> (N, 1, H, W)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, h += shift (mod 1), -> RGB; x: (N, 3, H, W) in [0, 1], shift: (N, 1, 1, 1).

    Elementwise ops only (channel max via torch.maximum): 3x faster on CPU than reductions over the
    channel dimension, same result to 1e-6.
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)  # V
    chroma = maxc - torch.minimum(torch.minimum(r, g), b)  # V * S
    c = chroma.clamp_min(1e-12)  # grey pixels: any hue, chroma 0 makes the result V
    hue6 = torch.where(maxc == r, (g - b) / c,
                       torch.where(maxc == g, 2 + (b - r) / c, 4 + (r - g) / c))
    hue6 = hue6.unsqueeze(1) + 6 * shift  # (N, 1, H, W), hue in sixths of a turn
    # HSV -> RGB as f(n) = V - V S clamp(min(k, 4 - k), 0, 1) with k = (n + 6 H) mod 6, n = 5, 3, 1
    n_rgb = constant((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = (n_rgb + hue6).remainder_(6)
    k = torch.minimum(k, 4 - k).clamp_(0, 1)
    return k.mul_(-chroma.unsqueeze(1)).add_(maxc.unsqueeze(1))


def color_jitter_params(n: int, brightness: float, contrast: float, saturation: float,
                        hue: float, p: float, generator: torch.Generator):
    """Per-image parameters of RandomApply(ColorJitter(b, c, s, h), p), as torchvision draws them.

    Returns factors (N, 4): brightness, contrast, saturation ~ U[1 - v, 1 + v], hue shift ~ U[-h, h]
    (identity 1, 1, 1, 0 where the jitter is not applied), and order (N, 4): a random permutation
    of the 4 ops per image.
    """
    on = uniform(n, 0, 1, generator) < p
    factors = [uniform(n, 1 - v, 1 + v, generator) for v in (brightness, contrast, saturation)]
    factors = torch.stack(factors + [uniform(n, -hue, hue, generator)], dim=1)  # (N, 4)
    identity = constant((1.0, 1.0, 1.0, 0.0), factors.device, factors.dtype)
    order = torch.argsort(uniform((n, 4), 0, 1, generator), dim=1)
    return torch.where(on.view(n, 1), factors, identity), order


def _blend_step(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """One ColorJitter blend per image, in place: x <- clamp(f x + (1 - f) base, 0, 1), the base
    being black (op 0, brightness), the mean grey level (op 1, contrast) or the greyscale image
    (op 2, saturation), as torchvision's _blend; op -1 (factor 1, black base) is the identity.
    x: (N, 3, H, W) in [0, 1]; op, factor: (N,)."""
    gray = _gray(x)  # (N, 1, H, W)
    op = op.view(-1, 1, 1, 1)
    base = torch.where(op == 2, gray, torch.where(op == 1, gray.mean(dim=(2, 3), keepdim=True),
                                                  0.0))
    f = torch.where(op < 0, 1.0, factor.view(-1, 1, 1, 1))
    return x.sub_(base).mul_(f).add_(base).clamp_(0, 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-image factors (N, 4) and op order (N, 4) (see color_jitter_params).

    x: (N, 3, H, W) in [0, 1]. Brightness, contrast and saturation are blends (_blend_step); hue
    rotates H in HSV (torchvision's semantics). Every image's order is kept exactly, with static
    shapes and no host sync: the blends that come before an image's hue run in 3 batch-wide steps
    (identity for the images with fewer), then one hue rotation for all, then the blends after it.
    One hue rotation instead of one per step: the rotation is 4x the cost of a blend.
    """
    n = x.shape[0]
    factors, order = factors.to(x.device, x.dtype), order.to(x.device)
    is_hue = (order == 3).int()
    pos = torch.argsort(is_hue, dim=1, stable=True)[:, :3]  # (N, 3) steps of the 3 blends, in order
    ops = order.gather(1, pos)  # (N, 3) which blend each is
    blend_factors = factors.gather(1, ops)  # (N, 3)
    hue_step = is_hue.argmax(dim=1, keepdim=True)  # (N, 1)
    x = x.clone()
    for before_hue in (True, False):
        for j in range(3):
            mine = pos[:, j:j + 1] < hue_step if before_hue else pos[:, j:j + 1] > hue_step
            op = torch.where(mine, ops[:, j:j + 1], -1).view(n)
            x = _blend_step(x, op, blend_factors[:, j])
        if before_hue:
            x = _shift_hue(x, factors[:, 3].view(n, 1, 1, 1))
    return x


def grayscale(x: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale: where on (N,) is True, the image becomes its luma copied to 3 channels."""
    return torch.where(on.to(x.device).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Gaussian blur with a per-image sigma (N,) in *pixels*, 0: none (PIL GaussianBlur, as the MoCo
    v2 / S3L code; the radius is not scaled with resolution, as in the official runs).

    x: (N, C, H, W). One separable, grouped convolution for the whole batch, kernels 2 radius + 1
    wide; an unblurred image gets a delta kernel (an exact identity). Borders repeat the edge, as
    PIL does.
    """
    n, c, height, width = x.shape
    sigma = sigma.to(x.device, x.dtype).view(n, 1)
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t ** 2 / (2 * sigma.clamp_min(1e-3) ** 2))  # (N, 2r + 1)
    kernel = torch.where(sigma > 0, kernel / kernel.sum(dim=1, keepdim=True), (t == 0).to(x.dtype))
    kernel = kernel.repeat_interleave(c, dim=0)  # (N C, 2r + 1)
    y = x.reshape(1, n * c, height, width)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1),
                 groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1),
                 groups=n * c)
    return y.view(n, c, height, width)


def solarize(x: torch.Tensor, on: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Where on (N,) is True, invert the pixels >= threshold (BYOL's solarisation, App. B)."""
    return torch.where(on.to(x.device).view(-1, 1, 1, 1) & (x >= threshold), 1 - x, x)


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel; x: (N, 3, H, W) in [0, 1]."""
    mean = constant(tuple(mean), x.device, x.dtype).view(1, 3, 1, 1)
    std = constant(tuple(std), x.device, x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def finetune_train_params(sizes: torch.Tensor, input_size: int, generator: torch.Generator,
                          random_resized_crop: bool = False):
    """The random part of finetune_train_view for images of sizes (N, 2) = (h, w): crop_boxes
    (Resize -> RandomCrop), or with random_resized_crop torchvision's RandomResizedCrop (area
    0.08-1, aspect 3/4-4/3: the official --random-resized-crop and CUB linear script), then the
    flips, as a dict like SSLAugment.sample's."""
    boxes = random_resized_crop_boxes(sizes, (0.08, 1.0), (3 / 4, 4 / 3), generator) \
        if random_resized_crop else crop_boxes(sizes, input_size, generator)
    return dict(sizes=sizes, boxes=boxes, flip=uniform(sizes.shape[0], 0, 1, generator) < 0.5)


def finetune_train_view(x: torch.Tensor, params: dict, input_size: int, mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, dtype=None) -> torch.Tensor:
    """Fine-tuning train transform of the official S3L code: Resize(input_size x 8/7) ->
    RandomCrop(input_size) anywhere in the resized photo (or RandomResizedCrop) -> horizontal
    flip -> normalise.

    x: (N, 3, L, L) uint8 or float in [0, 1]; params: finetune_train_params of their sizes;
    dtype: crop_resize's.
    """
    return normalize(crop_resize(x, params["sizes"], params["boxes"], input_size, params["flip"],
                                 dtype), mean, std)


def center_view(x: torch.Tensor, sizes: torch.Tensor, input_size: int, mean=IMAGENET_MEAN,
                std=IMAGENET_STD, dtype=None) -> torch.Tensor:
    """Test transform: Resize(input_size x 8/7) -> CenterCrop(input_size) -> normalise.
    x: (N, 3, L, L) uint8 or float in [0, 1], sizes (N, 2) = (h, w); dtype: crop_resize's."""
    boxes = crop_boxes(sizes, input_size)
    return normalize(crop_resize(x, sizes, boxes, input_size, dtype=dtype), mean, std)
