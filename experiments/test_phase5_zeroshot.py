"""Phase 5 — zero-shot: zeroing the super set costs far more multiple-choice accuracy than zeroing
a random set of the same size, on as many items as it takes to tell.

Items: by default the hand-written samples in fixtures/zeroshot (42 items over ZEROSHOT_TASKS: too
few to resolve ZEROSHOT_DROP, so the claim is inconclusive there, by design). With the environment
variable ESA_LM_EVAL_DATA naming a folder that holds ``{task}.jsonl|json|parquet`` files with the
tasks' own rows (the files an lm-evaluation-harness task yaml points to with ``data_files``; e.g.
ARC-Easy test, BoolQ/PIQA/HellaSwag validation), those are read instead
(``esa.analyses.tasks.find_local`` / ``read_raw``, prompts as lm-evaluation-harness builds them),
task by task, falling back to the sample for a task without a file.

Decision rule: rules_zeroshot.py (unit tests: test_rules_zeroshot.py)."""

import os
from pathlib import Path

import numpy as np
import pytest
import rules_zeroshot as rules
from criteria import ZEROSHOT_DROP, ZEROSHOT_LEVEL, ZEROSHOT_TASKS

from esa import plots
from esa.analyses.tasks import find_local, read_raw
from esa.claims.workbench import Condition

pytestmark = [pytest.mark.phase5, pytest.mark.smoke]
DATA_ENV = "ESA_LM_EVAL_DATA"


@pytest.fixture(scope="module")
def zeroshot_items(zeroshot_examples) -> tuple[dict, dict]:
    """(task -> examples, task -> source): lm-evaluation-harness files from $ESA_LM_EVAL_DATA where
    present, else the fixture samples."""
    folder = os.environ.get(DATA_ENV)
    items, sources = dict(zeroshot_examples), {t: "fixtures/zeroshot" for t in ZEROSHOT_TASKS}
    for task in ZEROSHOT_TASKS if folder else ():
        path = find_local(Path(folder).expanduser(), task)
        if path is not None:
            items[task], sources[task] = read_raw(task, path), path.name
    return items, sources


def hits(result: dict) -> tuple[int, int]:
    """(correct items, items) pooled over tasks from ``{task: {"acc", "n"}}``."""
    return sum(round(r["acc"] * r["n"]) for r in result.values()), sum(int(r["n"]) for r in result.values())


def accuracy_bars(by_set: dict, level: float, title: str):
    """Accuracy per task and set with Wilson CIs (``by_set``: set -> {task: {"acc", "n"}})."""
    fig, ax = plots.figure(6.5, 4.0)
    tasks = list(next(iter(by_set.values())))
    width = 0.8 / len(by_set)
    for j, (name, result) in enumerate(by_set.items()):
        acc = np.array([result[t]["acc"] for t in tasks])
        cis = np.array(
            [rules.wilson(round(result[t]["acc"] * result[t]["n"]), result[t]["n"], level) for t in tasks]
        )
        err = np.abs(np.vstack([acc - cis[:, 0], cis[:, 1] - acc]))
        ax.bar(np.arange(len(tasks)) + j * width, acc, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def test_zeroing_super_set_costs_accuracy(claim, workbench, model, metric, zeroshot_items):
    """Zeroing the super set drops zero-shot accuracy by ≥ 10 points more than a random set.

    Hypothesis: the top-k weights by the metric carry the model's zero-shot ability (Yu et al. 2024:
    removing the super weight drops zero-shot accuracy to about chance), k random weights do not.
    Measurement: multiple-choice accuracy (log-likelihood, lm-evaluation-harness style) pooled over
    ZEROSHOT_TASKS with the super set (top-k per tensor, seed 0) zeroed and with a random set of the
    same size zeroed; drop = acc(random) − acc(super) in points with Newcombe's 95% CI.
    Decision: rules_zeroshot.resolvable first (before any evaluation): inconclusive when the items
    cannot give a CI half-width ≤ 5 points whatever the accuracies (< 51 items); then
    rules_zeroshot.accuracy_drop: inconclusive while the CI half-width exceeds 5 points (about 770
    items are needed at accuracies near 0.5); holds iff drop ≥ 10 points.
    Minimum tier: smoke (the 42 fixture items stop at the first step at no cost; with
    $ESA_LM_EVAL_DATA three zero-shot passes over its items, minutes on a CPU).
    Falsified if: the CI's upper bound is below 10 points.
    """
    items, sources = zeroshot_items
    seed0 = workbench.tier.seeds[0]
    claim(threshold=ZEROSHOT_DROP).context(
        model=model, metric=metric, perturbation="zero", seed=seed0, k=workbench.tier.topk, sources=sources
    )
    rules.resolvable(claim, sum(len(ex) for ex in items.values()), ZEROSHOT_DROP, ZEROSHOT_LEVEL)
    by_set = {
        "baseline": workbench.zeroshot(model, items),
        "random": workbench.zeroshot(model, items, Condition(metric, seed0, "random", "zero")),
        "super": workbench.zeroshot(model, items, Condition(metric, seed0, "top", "zero")),
    }
    for name, result in by_set.items():
        claim.measure(f"zeroshot_acc_{name}", {t: r["acc"] for t, r in result.items()})
    claim.figure(
        accuracy_bars(by_set, ZEROSHOT_LEVEL, f"zero-shot accuracy by zeroed set ({model}, {metric})"),
        "accuracy per task with the super or a random set zeroed, with 95% Wilson CIs",
    )
    (k_random, n), (k_super, _) = hits(by_set["random"]), hits(by_set["super"])
    rules.accuracy_drop(claim, k_random, k_super, n, ZEROSHOT_DROP, ZEROSHOT_LEVEL)
