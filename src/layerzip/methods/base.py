"""What every method is: a config dataclass (torchao style) that knows its statistics, its spectrum and its math.

    CompressConfig          options every method shares (keep, alloc, include, exclude, sequential, correct)
      .gradients            the gradient statistics it needs: None | "output" (output Fisher) | "weight" (row Fisher)
      .gradient_batches()   the calibration sequences they read
      .factors(W, stats, r) (A, B) of one module: the pure math
      .spectrum(W, stats)   singular values whose squared tail is the method's layer loss at each rank (--alloc global)
      .ranks(shapes, ...)   one rank per module (None: stays dense) under `keep`
      .restructure_(...)    a whole-model change before the modules are decomposed (drop-blocks), with its report
      .module_config(...)   the config that decomposes the modules afterwards (itself; drop-blocks: its `then`)

Validated in `__post_init__`; JSON round trip via `to_dict` / `config_from_dict`; registered by name with
`@register_method("name")` (a name registered twice raises). Each field's `metadata["help"]` is its command-line
help: the CLI offers every field of every registered method as `--field-name`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar

import torch
from torch import nn

from .. import allocate, speed
from ..errors import LayerzipError
from ..models import select_targets
from ..nn import LowRankLinear, singular_values
from ..refine import Refine
from ..registry import METHODS
from .correct import refit_left

ALLOCATORS = ("uniform", "global")
OBJECTIVES = ("params", "latency")
register_method = METHODS.register


def option(default, help: str):
    """A config field with its command-line help."""
    return field(default=default, metadata={"help": help})


@dataclass
class CompressConfig:
    """Common options. `keep`: fraction of the targeted modules' parameters kept, in (0, 1]."""
    keep: float = option(0.5, "fraction of the targeted modules' parameters kept, in (0, 1]")
    alloc: str = option("uniform", "rank allocation: uniform | global (default: the method's best)")
    objective: str = option("params", "what --alloc global spends --keep on: params (least loss) | latency (also "
                                      "keep a module dense where its factorized form is not measurably faster; "
                                      "cached per machine). Conv methods: params | flops")
    include: str | None = option(None, "regex: compress only the linear layers whose name matches; or presets, "
                                       "comma-separated: blocks (the default targets), embeddings, lm_head")
    exclude: str | None = option(None, "regex: leave matching layers dense")
    sequential: bool = option(False, "calibrate each block on the already compressed blocks' output")
    correct: bool = option(False, "refit each left factor by least squares toward the original outputs")
    elastic: bool = option(False, "store every size from --keep-min to --keep-max in one directory; choose one when "
                                  "loading (eval/export --keep K, lz.load(DIR, keep=K)); --keep is the default size")
    keep_min: float = option(0.3, "--elastic: the smallest keep the directory can be loaded at")
    keep_max: float = option(1.0, "--elastic: the largest keep the directory can be loaded at (below 1: a smaller "
                                  "file)")
    refine_steps: int | None = option(None, "Adam steps per block fitting its low-rank factors so that, fed the "
                                            "compressed model's stream, it gives the original block's output "
                                            "(AA-SVD's block refinement); 0: off (default: 32 for svd-llm on "
                                            "causal LMs, else 0)")
    refine_lr: float = option(1e-4, "learning rate of --refine-steps")

    name: ClassVar[str] = "?"
    uses_stats: ClassVar[bool] = False      # the method's own math reads activation statistics
    sequential_ok: ClassVar[bool] = True
    objectives: ClassVar[tuple] = OBJECTIVES
    correct_ok: ClassVar[bool] = True
    stream_ok: ClassVar[bool] = True          # works on a streamed model, one block in memory at a time
    prefix_ok: ClassVar[bool] = False         # rank-r factors = the first r of the full-rank ones (--elastic)
    refine_ok: ClassVar[bool] = False         # its layers are low-rank factors that --refine-steps may train
    REFINE_STEPS: ClassVar[int] = 0           # --refine-steps when not given (where refinement applies)

    def __post_init__(self):
        if not isinstance(self.keep, (int, float)) or not 0 < self.keep <= 1:
            raise LayerzipError(f"--keep must be in (0, 1] (the fraction of parameters kept), got {self.keep}")
        if self.alloc is not None and self.alloc not in ALLOCATORS:
            raise LayerzipError(f"--alloc must be one of {', '.join(ALLOCATORS)}, got {self.alloc!r}")
        if self.objective not in self.objectives:
            raise LayerzipError(f"--objective must be one of {', '.join(self.objectives)}, got {self.objective!r}")
        if self.objective == "latency" and self.alloc == "uniform":
            raise LayerzipError(f"--objective latency chooses ranks globally; add --alloc global (method {self.name})")
        if self.correct and not self.correct_ok:
            raise LayerzipError(f"method {self.name} cannot run --correct; drop that flag")
        if self.sequential and not self.sequential_ok:
            raise LayerzipError(f"method {self.name} cannot run --sequential; drop that flag")
        if self.elastic:
            self._check_elastic()
        elif (self.keep_min, self.keep_max) != (0.3, 1.0):
            raise LayerzipError("--keep-min / --keep-max set the range of an elastic model; add --elastic or drop "
                                "them")
        if self.refine_steps is not None or self.refine_lr != 1e-4:
            Refine(self.refine_steps or 0, self.refine_lr)          # their ranges
        if self.refine_steps:
            if not self.refine_ok:
                ok = ", ".join(n for n, c in METHODS.items() if getattr(c, "refine_ok", False))
                raise LayerzipError(f"method {self.name} has no low-rank factors for --refine-steps to train; use "
                                    f"one of --method {ok} or drop --refine-steps")
            if self.sequential or self.elastic:
                raise LayerzipError("--refine-steps does not combine with --sequential (it walks the compressed "
                                    "stream itself) or --elastic (one decomposition for every size); drop one")
        if self.sequential and not self.needs_stats:
            raise LayerzipError(f"--sequential changes the statistics, which method {self.name} does not use; add "
                                "--correct (refit toward the original outputs) or pick svd-llm, asvd or cur")

    def _check_elastic(self) -> None:
        """--elastic stores one decomposition whose prefixes are every keep's: refuse what breaks that."""
        for name in ("keep_min", "keep_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise LayerzipError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
        if not self.keep_min <= self.keep <= self.keep_max:
            raise LayerzipError(f"--elastic: --keep {self.keep} (the default size) must lie in --keep-min "
                                f"{self.keep_min} .. --keep-max {self.keep_max}; change one of them")
        if not self.prefix_ok:
            ok = ", ".join(n for n, c in METHODS.items() if getattr(c, "prefix_ok", False))
            raise LayerzipError(f"method {self.name} cannot be --elastic (its rank-r factors are not a truncation of "
                                f"its full-rank ones); use one of --method {ok} or drop --elastic")
        if self.alloc == "uniform":
            raise LayerzipError("--elastic chooses every size by the global allocation; add --alloc global (or "
                                "drop --alloc uniform)")
        if self.objective == "latency":
            raise LayerzipError("--elastic cannot use --objective latency (its speed limits are measured per "
                                "machine); use --objective params or drop --elastic")
        if self.sequential or self.correct:
            raise LayerzipError("--elastic stores one decomposition for every size, which --sequential and "
                                "--correct (refit per rank) do not give; drop them or drop --elastic")

    @property
    def needs_stats(self) -> bool:
        """Whether calibration statistics are collected: for the method's math, or for --correct's refit."""
        return self.uses_stats or self.correct

    # ---------------------------------------------------------------------------------------- what it computes
    def factors(self, W: torch.Tensor, stats, rank: int):
        raise NotImplementedError

    def build_layer(self, W: torch.Tensor, bias, stats, rank: int) -> nn.Module:
        """W: float64 out×in. Returns the replacement module (float64; the caller casts)."""
        A, B = self.factors(W, stats, rank)
        if self.correct:                 # A = W C Bᵀ (B G' Bᵀ)⁻¹: least squares toward the original outputs
            A = refit_left(W, A, B, stats)
        return LowRankLinear.from_factors(A, B, None if bias is None else bias.detach().double())

    def spectrum(self, W: torch.Tensor, stats) -> torch.Tensor:
        """Singular values whose squared tail is this method's layer loss at each rank (for --alloc global)."""
        return singular_values(W)

    @property
    def reads_gram(self) -> bool:
        """Whether the Gram itself is read after its whitening is computed; if not, it is freed then (the
        whitening factor is as large: this halves the largest statistics a block holds)."""
        return True

    @property
    def gradients(self) -> str | None:
        """The gradient statistics of the original model this method weights by, gathered before anything changes:
        None, "output" (stats.collect_output_fisher), "output_cov" (the same, full=True) or "weight"
        (stats.collect_fisher)."""
        return None

    def gradient_batches(self, calib: list[dict]) -> list[dict]:
        """The calibration sequences the gradient statistics read: all of them unless the method reads fewer."""
        return calib

    @property
    def encoder_loss(self) -> str:
        """An encoder's sensitivity loss for the gradient statistics (stats.fisher): "embedding" (the Fisher of its
        pooled embedding) or "contrastive"."""
        return "embedding"

    def targets_of(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules it replaces, {name: module}: the linear layers of the repeated blocks (`include` / `exclude`
        change that); the convolution methods pick convolutions instead (methods/conv.py)."""
        return select_targets(model, self.include, self.exclude)

    # ---------------------------------------------------------------------------------------------- its budget
    @property
    def needs_spectra(self) -> bool:
        """Whether `ranks` reads the modules' spectra."""
        return self.alloc == "global"

    @property
    def loss_units(self) -> bool:
        """Whether `spectrum` is already in comparable units across modules (else global allocation normalizes it)."""
        return False

    def ranks(self, shapes: dict[str, tuple[int, int]], keep: float, spectrum_of=None) -> dict[str, int | None]:
        """Ranks at `keep` of the weights; `spectrum_of(name)` -> that module's spectrum (when `needs_spectra`)."""
        if self.alloc == "global":
            path = self.allocation({n: spectrum_of(n) for n in shapes}, shapes)
            return path.ranks(keep * path.dense_params)
        return allocate.uniform_ranks(shapes, keep)

    def allocation(self, spectra: dict, shapes: dict[str, tuple[int, int]]) -> allocate.AllocationPath:
        """The global allocation of every budget (nested: allocate.AllocationPath) from the modules' spectra."""
        fast = speed.max_ranks(shapes, progress=True) if self.objective == "latency" else None
        return allocate.AllocationPath(shapes, spectra, normalize=not self.loss_units, max_ranks=fast)

    # ----------------------------------------------------------------------------------------- its whole-model part
    def resolve(self, model: nn.Module, calib: list[dict] | None = None) -> "CompressConfig":
        """The config with model- and data-dependent defaults filled in (see SVDLLM); the report records this one."""
        steps = self.resolved_refine_steps(model)
        return self if steps == self.refine_steps else replace(self, refine_steps=steps)

    def resolved_refine_steps(self, model: nn.Module | None = None) -> int:
        """--refine-steps, or the method's default for `model` where refinement applies (not with --sequential,
        --elastic)."""
        if self.refine_steps is not None:
            return self.refine_steps
        return self.REFINE_STEPS if self.refine_ok and not (self.sequential or self.elastic) else 0

    @property
    def refine(self) -> Refine | None:
        """The block refinement the driver runs after each block's decomposition (refine.Refine), or None (also
        before `resolve` fills in the default)."""
        return Refine(self.refine_steps, self.refine_lr) if self.refine_steps else None

    def restructure_(self, model: nn.Module, calib: list[dict] | None, progress: bool) -> dict:
        """A whole-model change made before the modules are decomposed; returns its report entries."""
        return {}

    def module_config(self, left_params: int, target_params: int) -> "CompressConfig | None":
        """The config that decomposes the remaining targets (`left_params` of the original `target_params`)."""
        return self

    @property
    def label(self) -> str:
        """The method as the report names it."""
        return self.name

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}


def config_from_dict(d: dict) -> CompressConfig:
    """The config named by d["method"] with d's other entries as options (None / False: not given). A method
    "a+b" is method a with then=b (drop-blocks+svd-llm)."""
    d = dict(d)
    name, plus, then = str(d.pop("method", None)).partition("+")
    if plus:
        d["then"] = then
    cls = METHODS[name]
    known = {f.name for f in fields(cls)}
    stray = sorted(k for k, v in d.items() if k not in known and v is not None and v is not False)
    if stray:
        raise LayerzipError(f"option {', '.join('--' + k.replace('_', '-') for k in stray)} does not apply to "
                            f"method {name}; drop it or change --method")
    return cls(**{k: v for k, v in d.items() if k in known and v is not None})
