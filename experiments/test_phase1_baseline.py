"""Phase 1 — baseline: the perplexity is real (finite, not leaking) and stable across seeds."""

import math

import pytest
from criteria import LEAK_PPL, PPL_SEED_VARIATION

pytestmark = [pytest.mark.phase1, pytest.mark.smoke]


def test_baseline_ppl_not_leaking(claim, workbench, model):
    """Baseline token perplexity is finite and above the leak threshold on natural text."""
    base = workbench.baseline(model)
    claim(threshold=LEAK_PPL).context(model=model)
    claim.measure("ppl", base.ppl, key=True)
    claim.measure("accuracy", base.accuracy)
    claim.measure("n_tokens", base.n_tokens)
    claim.check(math.isfinite(base.ppl), f"baseline PPL is {base.ppl}")
    claim.expect(base.ppl, ">", LEAK_PPL)


def test_ppl_stable_across_seeds(claim, workbench, model):
    """Perplexity on seed-drawn window samples varies by less than 5% across seeds."""
    seeds = workbench.tier.seeds
    ppls = [workbench.baseline_resampled(model, s).ppl for s in seeds]
    spread = (max(ppls) - min(ppls)) / (sum(ppls) / len(ppls))
    claim(threshold=PPL_SEED_VARIATION).context(model=model, seeds=list(seeds))
    claim.measure("ppl_per_seed", ppls)
    claim.measure("relative_spread", spread, key=True)
    claim.expect(spread, "<", PPL_SEED_VARIATION)


def test_accuracy_and_throughput_recorded(claim, workbench, model):
    """Next-token accuracy and tokens/s are measured, finite and positive."""
    base = workbench.baseline(model)
    claim().context(model=model)
    claim.measure("accuracy", base.accuracy, key=True)
    claim.measure("tokens_per_s", base.tokens_per_s)
    claim.measure("peak_memory_mb", base.peak_memory_bytes / 2**20)
    claim.check(0.0 < base.accuracy <= 1.0, f"accuracy {base.accuracy} outside (0, 1]")
    claim.check(math.isfinite(base.tokens_per_s) and base.tokens_per_s > 0, f"tokens/s {base.tokens_per_s}")


def test_untrained_architecture_predicts_uniformly(claim, workbench, arch):
    """An untrained (random-init) model's perplexity is within 2x of its vocabulary size."""
    base = workbench.baseline(arch)
    vocab = workbench.model(arch).model.config.vocab_size
    claim(threshold=[vocab / 2, vocab * 2]).context(model=arch)
    claim.measure("ppl", base.ppl, key=True)
    claim.measure("vocab_size", vocab)
    claim.check(
        vocab / 2 <= base.ppl <= vocab * 2, f"PPL {base.ppl:.1f} not within [{vocab / 2}, {vocab * 2}]"
    )
