"""Statistics of convolution inputs: the Gram of the input patches (im2col rows, width in·kh·kw, in the order of
`W.flatten(1)`), unfolded a few images at a time (≤ 16M values) and summed in float64 1,024 rows at a time, and the input's spatial size (for FLOPs).

For a kernel W (out × in·kh·kw as a matrix) and patches X, the layer's output error of any replacement W' is
‖(W − W') Xᵀ‖²_F = tr((W − W') G (W − W')ᵀ) with G = XᵀX: the methods in methods/conv.py minimize it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import LayerzipError
from ..models import call_model
from .activations import ModuleStats


@dataclass
class ConvStats:
    """Patch Gram (a ModuleStats of width in·kh·kw: gram, whitening, tokens = patches) and the input size."""
    patches: ModuleStats
    in_hw: tuple[int, int] | None = None
    images: int = 0
    PATCH_VALUES: int = field(default=1 << 24, repr=False)

    @property
    def gram(self) -> torch.Tensor:
        return self.patches.gram

    @property
    def whitening(self):
        return self.patches.whitening

    @torch.no_grad()
    def add(self, conv: nn.Conv2d, padding: tuple[int, int], x: torch.Tensor) -> None:
        self.in_hw = self.in_hw or tuple(x.shape[-2:])
        x = x.reshape(-1, *x.shape[-3:])
        n, per = self.patches.n, x[0].numel() * conv.kernel_size[0] * conv.kernel_size[1]
        group = max(1, self.PATCH_VALUES // max(per, 1))      # images unfolded together: ≤ PATCH_VALUES values
        for imgs in x.split(group):
            cols = F.unfold(imgs, conv.kernel_size, conv.dilation, padding, conv.stride)   # (B, in·kh·kw, L)
            self.patches.add(cols.transpose(1, 2).reshape(-1, n))
            self.images += len(imgs)


def run_calibration(model: nn.Module, calib, progress: bool = True, desc: str = "calibrating") -> None:
    """One forward of `model` per item of `calib` (a tensor: model(x); a dict: model(**d); a tuple: model(*t)),
    in eval mode (batch norm uses its running statistics and updates nothing), under no_grad."""
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            for item in tqdm(calib, desc=desc, unit="batch", disable=not progress):
                call_model(model, item, device)
    finally:
        for m, t in modes.items():
            m.training = t


def collect_conv_stats(model: nn.Module, targets: dict[str, nn.Module], calib, padding: dict[str, tuple],
                       grams: bool = True, progress: bool = True) -> dict[str, ConvStats]:
    """{name: ConvStats} of every target conv's input over `calib` (`grams=False`: only the input sizes).
    `padding[name]`: the conv's numeric padding."""
    out = {n: ConvStats(ModuleStats(m.in_channels * m.kernel_size[0] * m.kernel_size[1])) for n, m in
           targets.items()}

    def hook(name):
        def pre(mod, args):
            x = args[0]
            if grams:
                out[name].add(mod, padding[name], x)
            else:
                out[name].in_hw = out[name].in_hw or tuple(x.shape[-2:])
                out[name].images += x.shape[0] if x.dim() == 4 else 1
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in targets.items()]
    try:
        run_calibration(model, calib, progress, desc="calibrating convolutions" if grams else "measuring sizes")
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, s in out.items() if s.in_hw is None]
    if missing:
        raise LayerzipError(f"calibration never reached {missing[0]} (and {len(missing) - 1} more); exclude it "
                            "with --exclude or check the model's forward")
    return out
