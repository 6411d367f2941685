"""Compute tiers: how much text, how many seeds and samples an experiment run uses."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from esa.errors import ConfigError


@dataclass(frozen=True)
class Tier:
    """One budget level; experiments read every size from here, never hard-code it."""

    name: str
    max_length: int  # tokens per window
    eval_windows: int  # windows scored for perplexity
    calib_windows: int  # windows used to compute sensitivity scores
    seeds: tuple[int, ...]  # seeds for random baselines / repeated runs
    hutchinson_samples: int  # Rademacher probes for Hessian-diagonal estimates
    topk: int  # entries selected per tensor (or globally)
    batch_size: int

    def to_dict(self) -> dict:
        """Plain-Python view for reports (seeds as a list)."""
        d = asdict(self)
        d["seeds"] = list(self.seeds)
        return d


DEFAULT_TIER = "smoke"
TIERS: dict[str, Tier] = {
    "smoke": Tier("smoke", 128, 8, 4, (0, 1, 2), 4, 100, 4),
    # 16 x 512 evaluation tokens: phase 3 evaluates ~210 conditions (20 random sets x 3 seeds for the
    # null alone), ~20 s each for a 135M model on 2 CPU cores, so the tier records in about an hour;
    # batches of 2: Hutchinson's double backward over 8 x 512 tokens of a 135M model took > 23 GB
    "standard": Tier("standard", 512, 16, 16, (0, 1, 2), 16, 100, 2),
    # 48 calibration windows: WikiText-2 validation holds ~120 windows of 2048 tokens, and seeds must
    # draw materially different sets (expected pairwise overlap n/pool <= 0.5, esa.data)
    "extended": Tier("extended", 2048, 128, 48, (0, 1, 2, 3, 4), 64, 100, 4),
}


def get_tier(name: str | Tier) -> Tier:
    """Return the tier called `name` (a `Tier` is passed through); `ConfigError` if unknown."""
    if isinstance(name, Tier):
        return name
    try:
        return TIERS[str(name).strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown tier {name!r}: use one of {', '.join(TIERS)}") from None
