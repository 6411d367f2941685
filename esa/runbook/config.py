"""``ExperimentConfig``: every option of one runbook run (the ``esa run`` flags map 1:1 onto its
fields), validated before anything is loaded, and ``default_out_dir``: the directory a run without
``--out-dir`` writes to.

Perturbation options per method (``scale_for``): ``--scale`` is the factor of ``magnitude_scaling``
(and of ``scale``), ``--bits`` the bit count b of ``quantization`` (grid levels 2^(b-1) - 1),
``--noise-sigma`` the row-RMS factor of ``adaptive_noise``; otherwise ``--perturb-scale`` for the
methods named in ``--perturb``, else the registry default. The advanced perturbations
(``--advanced-perturbations``) run like ``--perturb`` ones (super set and controls, per seed);
``progressive`` is an analysis (``esa.runbook.extras``), not a registered perturbation.

Curvature metrics (``hutchinson_diag``, ``hessian_diag``) cost one double backward per calibration
window (and per probe, or per scored entry for the exact diagonal), so ``--curvature-calib-samples``
gives them fewer windows than the first-order metrics (the seed's draw of n windows: a subset of
its first-order windows), and ``--hessian-tensors REGEX`` names the tensors the exact
``hessian_diag`` scores (it refuses more than ``HESSIAN_MAX_ENTRIES`` entries); both are recorded
in the manifest (``curvature``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from esa.errors import ConfigError
from esa.metrics import METRICS
from esa.perturb import PERTURBATIONS, POSITIONS, resolve_prob, resolve_scale

CONTROLS = {"random_k": "random", "bottom_k": "bottom"}
CURVATURE = ("hutchinson_diag", "hessian_diag")  # double-backward metrics (--curvature-calib-samples)
MODES = ("per_layer", "global")
SCORE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ADVANCED = ("adaptive_noise", "magnitude_scaling", "quantization", "progressive")
CLUSTERING = ("kmeans", "dbscan")
DEFAULT_TASKS = ("hellaswag", "piqa", "boolq", "arc_easy")  # hub tasks (esa.analyses.tasks.TASKS)
OUT_ROOT = Path("outputs") / "esa"
_PROBE = torch.tensor([1.0, 0.3])  # weights a method must change at its scale (not all on a grid)
_OWN_OPTION = {
    "magnitude_scaling": "scale",
    "scale": "scale",
    "quantization": "bits",
    "adaptive_noise": "noise_sigma",
}


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
    bos: str = "auto"  # windows start with BOS: auto (as the tokenizer does) | always | never
    hutchinson_samples: int = 8
    curvature_calib_samples: int | None = None  # windows per seed of the curvature metrics (None: all)
    hessian_tensors: str | None = None  # regex (re.search) of the tensors hessian_diag scores
    include_embeddings: bool = False
    include_norms: bool = False
    save_plots: bool = False
    vector_plots: bool = False  # with save_plots: PDF and SVG copies next to each PNG (for papers)
    overwrite: bool = False
    use_cache: bool = True
    cache_root: str | None = None
    progress: bool = True
    eval_batch_size: int | None = None  # None: auto (about 16k tokens per forward on CUDA)
    score_dtype: str = "fp32"  # "bf16": lean scores and accumulators (half the memory)
    memory_limit: float | None = None  # GiB the scoring passes plan to peak at (None: what is free)
    device_map: str | None = None  # e.g. "auto": split a large model over the visible GPUs
    compile: bool | None = None  # torch.compile evaluation: None = auto (one CUDA device, >= 100M params)
    reuse_evals: bool = True  # evaluate an identical perturbed model once (e.g. random_k per seed)
    # the old runner's options (esa.runbook.extras runs the analyses; README "esa run options")
    weight_analysis: bool = False  # cluster the top-k (kmeans / dbscan) + metric correlations
    architecture_analysis: bool = False  # layer x component (head, expert) shares vs parameter shares
    temporal_stability: bool = False  # top-k Jaccard matrix across conditions (and checkpoints)
    checkpoints: list[str] = field(default_factory=list)  # training checkpoints, in training order
    advanced_perturbations: list[str] = field(default_factory=list)  # of ADVANCED
    clustering_method: str = "kmeans"
    n_clusters: int = 5
    downstream_tasks: bool = False  # zero-shot tasks on the baseline and every perturbed condition
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # names or JSONL files
    task_samples: int = 100  # examples per task
    scale: float | None = None  # magnitude_scaling (and scale) factor
    bits: int | None = None  # quantization bit count
    noise_sigma: float | None = None  # adaptive_noise factor of the row RMS
    export_stats: bool = False  # per-tensor score statistics (score_stats.csv)
    export_topk_csv: bool = True  # top_weights.csv: always written (accepted for the old runner)

    def validate(self) -> None:
        """Check every option that needs no model; raise ConfigError naming the fix."""
        for metric in self.metrics:
            if metric not in METRICS:
                raise ConfigError(f"unknown metric {metric!r}: choose from {', '.join(sorted(METRICS))}")
        for name in self.advanced_perturbations:
            if name not in ADVANCED:
                raise ConfigError(
                    f"unknown advanced perturbation {name!r}: choose from {', '.join(ADVANCED)}"
                )
        self._validate_extras()
        for method in self.methods():
            if method not in PERTURBATIONS:
                raise ConfigError(
                    f"unknown perturbation {method!r}: choose from {', '.join(sorted(PERTURBATIONS))}"
                )
            changes = PERTURBATIONS[method].changes
            if changes is not None and not bool(changes(_PROBE, self.scale_for(method)).any()):
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
            ("--curvature-calib-samples", self.curvature_calib_samples),
        ):
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            raise ConfigError(f"--eval-batch-size must be a positive integer, got {self.eval_batch_size}")
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise ConfigError(f"--memory-limit must be a positive number of GiB, got {self.memory_limit}")
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
        self._validate_curvature()

    def _validate_curvature(self) -> None:
        if self.curvature_calib_samples is not None and self.curvature_calib_samples > self.calib_windows():
            raise ConfigError(
                f"--curvature-calib-samples {self.curvature_calib_samples} exceeds the "
                f"{self.calib_windows()} calibration windows per seed: lower it or raise --calib-samples"
            )
        if self.hessian_tensors is not None:
            if "hessian_diag" not in self.metrics:
                raise ConfigError("--hessian-tensors selects the tensors of hessian_diag: add it to --metric")
            try:
                re.compile(self.hessian_tensors)
            except re.error as exc:
                raise ConfigError(f"--hessian-tensors {self.hessian_tensors!r} is no regex: {exc}") from None

    def calib_windows(self) -> int:
        """Calibration windows per seed of the first-order metrics: --calib-samples, else --max-samples."""
        return self.calib_samples or self.max_samples

    def windows_for(self, metric: str) -> int:
        """Calibration windows per seed of ``metric``: --curvature-calib-samples for the curvature
        metrics when set, else ``calib_windows()``."""
        if metric in CURVATURE and self.curvature_calib_samples is not None:
            return self.curvature_calib_samples
        return self.calib_windows()

    def _validate_extras(self) -> None:
        if self.clustering_method not in CLUSTERING:
            raise ConfigError(f"unknown --clustering-method {self.clustering_method!r}: use kmeans or dbscan")
        for name, value in (("--n-clusters", self.n_clusters), ("--task-samples", self.task_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.scale is not None and not self.scale > 0:
            raise ConfigError(f"--scale must be > 0 (the magnitude_scaling factor), got {self.scale}")
        if self.noise_sigma is not None and not self.noise_sigma >= 0:
            raise ConfigError(f"--noise-sigma must be >= 0, got {self.noise_sigma}")
        if self.checkpoints and not self.temporal_stability:
            raise ConfigError("--checkpoints are compared by --temporal-stability: add that flag")
        if self.downstream_tasks and not self.tasks:
            raise ConfigError("--downstream-tasks needs at least one task: pass --tasks piqa or a JSONL file")

    def methods(self) -> list[str]:
        """The perturbations that run: ``--perturb`` then the registered advanced ones, once each."""
        extra = [m for m in self.advanced_perturbations if m != "progressive"]
        return list(dict.fromkeys([*self.perturbations, *extra]))

    def scale_for(self, method: str) -> float | None:
        """The method's own option (--scale, --bits, --noise-sigma) when given, else --perturb-scale
        for a method named in --perturb, else the registry's default scale of ``method``."""
        own = getattr(self, _OWN_OPTION.get(method, ""), None)
        if own is not None:
            return own
        return resolve_scale(method, self.perturb_scale if method in self.perturbations else None)

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


def default_out_dir(config: ExperimentConfig, root: str | Path = OUT_ROOT) -> Path:
    """``root/<model>/<metric>_<mode>_k<topk>[_<perturbation>]`` (metrics and perturbations joined
    by ``+``; the model's last path part, e.g. ``Llama-3.1-8B``), with ``-2``, ``-3``... appended
    when that path exists: an earlier run is never overwritten."""
    model = _slug(Path(str(config.model).rstrip("/")).name or str(config.model))
    name = f"{'+'.join(config.metrics)}_{config.mode}_k{config.topk}"
    if config.methods():
        name += "_" + "+".join(config.methods())
    base = Path(root) / model / _slug(name)
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _slug(text: str) -> str:
    """``text`` with every character outside ``[A-Za-z0-9._+-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)
