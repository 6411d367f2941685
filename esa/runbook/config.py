"""``ExperimentConfig``: every option of one runbook run (the ``esa run`` flags map 1:1 onto its
fields), validated before anything is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from esa.errors import ConfigError
from esa.metrics import METRICS
from esa.perturb import PERTURBATIONS, POSITIONS, resolve_prob, resolve_scale

CONTROLS = {"random_k": "random", "bottom_k": "bottom"}
MODES = ("per_layer", "global")
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class ExperimentConfig:
    """Everything one run needs (the CLI flags map 1:1 onto these fields)."""

    model: str
    out_dir: str | None = None
    metrics: list[str] = field(default_factory=lambda: ["grad_x_weight"])
    mode: str = "per_layer"
    topk: int = 100
    max_samples: int = 32
    max_length: int = 512
    batch_size: int = 8
    calib_samples: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    stability_check: bool = False
    perturbations: list[str] = field(default_factory=lambda: ["sign_flip"])
    perturb_scale: float | None = None  # None: the registry's (gauss_noise σ = 0.02·|w|, scale 0)
    perturb_prob: float | None = None  # None: the registry's (bit_flip 0.05, the others 1.0)
    perturb_bit: int | str | None = None  # bit_flip: an index or a name of esa.perturb.POSITIONS
    controls: list[str] = field(default_factory=lambda: ["random_k", "bottom_k"])
    dtype: str | None = None
    device: str | None = None
    data_file: str | None = None
    calib_file: str | None = None
    hutchinson_samples: int = 8
    include_embeddings: bool = False
    include_norms: bool = False
    save_plots: bool = False
    overwrite: bool = False
    use_cache: bool = True
    cache_root: str | None = None
    progress: bool = True
    eval_batch_size: int | None = None  # None: auto (about 16k tokens per forward on CUDA)
    score_dtype: str = "fp32"  # "bf16": lean scores and accumulators (half the memory)
    device_map: str | None = None  # e.g. "auto": split a large model over the visible GPUs
    compile: bool | None = None  # torch.compile evaluation: None = auto (one CUDA device, >= 100M params)
    reuse_evals: bool = True  # evaluate an identical perturbed model once (e.g. random_k per seed)

    def validate(self) -> None:
        """Check every option that needs no model; raise ConfigError naming the fix."""
        for metric in self.metrics:
            if metric not in METRICS:
                raise ConfigError(f"unknown metric {metric!r}: choose from {', '.join(sorted(METRICS))}")
        for method in self.perturbations:
            if method not in PERTURBATIONS:
                raise ConfigError(
                    f"unknown perturbation {method!r}: choose from {', '.join(sorted(PERTURBATIONS))}"
                )
            changes = PERTURBATIONS[method].changes
            if changes is not None and not bool(changes(torch.ones(1), self.scale_for(method)).any()):
                raise ConfigError(
                    f"{method} with --perturb-scale {self.scale_for(method)} changes no weight: pick another scale"
                )
        if self.mode not in MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}: use per_layer or global")
        if self.topk <= 0:
            raise ConfigError(f"--topk must be a positive integer, got {self.topk}")
        for name, value in (
            ("--max-samples", self.max_samples),
            ("--max-length", self.max_length),
            ("--batch-size", self.batch_size),
            ("--hutchinson-samples", self.hutchinson_samples),
        ):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ConfigError(f"--eval-batch-size must be a positive integer, got {self.eval_batch_size}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ConfigError(f"unknown --score-dtype {self.score_dtype!r}: use fp32 or bf16")
        if self.calib_samples is not None and self.calib_samples <= 0:
            raise ConfigError(f"--calib-samples must be a positive integer, got {self.calib_samples}")
        if self.perturb_scale is not None and self.perturb_scale < 0:
            raise ConfigError(f"--perturb-scale must be >= 0, got {self.perturb_scale}")
        if self.perturb_prob is not None and not 0.0 <= self.perturb_prob <= 1.0:
            raise ConfigError(f"--perturb-prob must be within [0, 1], got {self.perturb_prob}")
        bit = self.perturb_bit
        if isinstance(bit, bool) or not (
            bit is None or bit in POSITIONS or (isinstance(bit, int) and bit >= 0)
        ):
            raise ConfigError(
                f"--perturb-bit must be a bit index >= 0 or one of {', '.join(POSITIONS)}, got {bit!r}"
            )
        for control in self.controls:
            if control not in CONTROLS:
                raise ConfigError(f"unknown control {control!r}: use random_k and/or bottom_k")
        if not self.seeds:
            raise ConfigError("--seeds needs at least one seed, e.g. --seeds 0,1,2")

    def scale_for(self, method: str) -> float | None:
        """--perturb-scale, else the registry's default scale of ``method``."""
        return resolve_scale(method, self.perturb_scale)

    def prob_for(self, method: str) -> float:
        """--perturb-prob, else the registry's default probability of ``method``."""
        return resolve_prob(method, self.perturb_prob)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_int_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (ConfigError on junk)."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers like 0,1,2, got {text!r}") from None
    return values
