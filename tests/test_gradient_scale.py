"""Tests for fp32-accurate scoring at scale (esa.metrics.accumulate): accumulators offloaded to
host memory give the same sums, bit for bit, as on-device ones; the memory plan prefers no
checkpointing, then checkpointing, then offloading spread over the model; the bench's new
sections run on the CPU. (On the GPU the offloaded path is checked by ``python -m esa.bench
--sections accuracy``: ``offload_bitwise_equal``, BENCHMARKS.md.)"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.bench import main
from esa.bench.sections_accuracy import deterministic
from esa.data import random_windows
from esa.metrics.accumulate import Accumulators, offload_order, offload_until, plan_memory
from esa.metrics.registry import compute_scores
from esa.models import load_model

SETTINGS = settings(max_examples=25, deadline=None)
GIB = 1 << 30


@pytest.fixture(scope="module")
def tiny():
    """name -> (LoadedModel, calibration windows [4, 24])."""
    out = {}
    for name in ("tiny-llama", "tiny-mixtral"):
        lm = load_model(name, device="cpu")
        out[name] = (lm, random_windows(4, 24, lm.model.config.vocab_size, seed=0))
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mixtral"])
@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared"])
def test_offloaded_scores_equal_on_device_scores_exactly(tiny, name, metric):
    """(hutchinson_diag: tests/test_curvature.py, the lean estimator with and without offload.)"""
    lm, calib = tiny[name]
    args = dict(batch_size=2, progress=False, hutchinson_samples=2)
    report: dict = {}
    kept = compute_scores(lm, metric, calib, offload=False, **args)
    moved = compute_scores(lm, metric, calib, offload=True, report=report, **args)
    assert report["memory_plan"]["offloaded"] == len(moved) > 0
    assert set(moved) == set(kept)
    for n in kept:
        assert moved[n].device.type == "cpu" and moved[n].dtype == torch.float32
        assert torch.equal(moved[n], kept[n]), n
    assert all(p.grad is None for p in lm.model.parameters())


def test_offloaded_lean_scores_of_a_bf16_model_equal_on_device_ones():
    lm = load_model("tiny-llama", dtype=torch.bfloat16, device="cpu")
    calib = random_windows(4, 16, lm.model.config.vocab_size, seed=1)
    args = dict(batch_size=2, progress=False)
    for dtype in (torch.float32, torch.bfloat16):
        kept = compute_scores(lm, "grad_x_weight", calib, offload=False, score_dtype=dtype, **args)
        moved = compute_scores(lm, "grad_x_weight", calib, offload=True, score_dtype=dtype, **args)
        assert all(torch.equal(moved[n], kept[n]) and kept[n].dtype == dtype for n in kept)


@SETTINGS
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    steps=st.integers(1, 5),
    square=st.booleans(),
    data=st.data(),
)
def test_accumulators_offloaded_sums_match_direct_sums(sizes, steps, square, data):
    """Σ_t x_t (or Σ x_t²) then a finishing transform: every placement gives the same bits."""
    offload = data.draw(st.sets(st.integers(0, len(sizes) - 1)))
    gen = torch.Generator().manual_seed(len(sizes) * 31 + steps)
    params = [torch.randn(n, generator=gen) for n in sizes]
    xs = [[torch.randn(n, generator=gen).bfloat16() for n in sizes] for _ in range(steps)]
    expected = [torch.zeros(n) for n in sizes]
    for step in xs:
        for e, x in zip(expected, step):
            if square:
                e.addcmul_(x.float(), x.float())
            else:
                e.add_(x)
    with Accumulators(params, torch.float32, offload) as acc:
        for step in xs:
            for i, x in enumerate(step):
                acc.add(i, x, square)
        got = acc.finish(lambda s, i: s.mul_(params[i]).abs_())
    for e, g, p in zip(expected, got, params):
        assert torch.equal(g, e.mul_(p).abs_())


def test_accumulators_without_adds_are_zero():
    params = [torch.ones(3), torch.ones(2)]
    with Accumulators(params, torch.float32, offload={1}) as acc:
        got = acc.result()
    assert all(torch.equal(g, torch.zeros_like(p)) for g, p in zip(got, params))


# --- the memory plan ----------------------------------------------------------------------------


def _acts(full: int, ckpt: int):
    return lambda checkpointed: ckpt if checkpointed else full


def test_plan_prefers_no_checkpointing_then_checkpointing_then_offload():
    accs = [GIB] * 8
    plan = plan_memory(accs, 20 * GIB, _acts(4 * GIB, GIB))
    assert not plan.checkpoint and not plan.offload
    plan = plan_memory(accs, 12 * GIB, _acts(8 * GIB, GIB))
    assert plan.checkpoint and not plan.offload
    plan = plan_memory(accs, 8 * GIB, _acts(8 * GIB, GIB))
    assert plan.checkpoint and plan.offload
    kept = sum(accs[i] for i in range(len(accs)) if i not in plan.offload)
    assert kept + GIB + 2 * GIB <= 8 * GIB - (1 << 30)  # activations, two work buffers, slack


def test_plan_honours_forced_choices():
    accs = [GIB] * 4
    roomy = _acts(GIB, GIB)
    assert plan_memory(accs, 100 * GIB, roomy, checkpoint=True).checkpoint
    assert plan_memory(accs, 100 * GIB, roomy, offload=True).offload == frozenset(range(4))
    tight = plan_memory(accs, 2 * GIB, roomy, checkpoint=False)
    assert not tight.checkpoint and not tight.offload
    assert not plan_memory(accs, 2 * GIB, roomy, offload=False).offload


@SETTINGS
@given(
    accs=st.lists(st.integers(1, 4 * GIB), min_size=1, max_size=40),
    room=st.integers(0, 64 * GIB),
)
def test_offload_until_leaves_what_fits(accs, room):
    moved = offload_until(accs, room)
    kept = sum(accs) - sum(accs[i] for i in moved)
    work = 2 * max((accs[i] for i in moved), default=0)
    assert kept + work <= room or moved == frozenset(range(len(accs)))
    # minimal: putting back the last one offloaded would not fit
    order = [i for i in offload_order(len(accs)) if i in moved]
    if order:
        last = order[-1]
        rest = [accs[i] for i in moved if i != last]
        assert kept + accs[last] + 2 * max(rest, default=0) > room


@given(n=st.integers(0, 500))
def test_offload_order_is_a_spread_permutation(n):
    order = offload_order(n)
    assert sorted(order) == list(range(n))
    if n >= 16:  # a prefix of about √n positions spans the model, last layer to first
        k = math.isqrt(n) + 2
        assert order[0] == n - 1 and min(order[:k]) < 2 * math.isqrt(n) + 2


def test_cpu_plan_in_report_and_checkpoint_option(tiny):
    lm, calib = tiny["tiny-llama"]
    report: dict = {}
    compute_scores(lm, "grad_x_weight", calib, batch_size=2, progress=False, report=report)
    assert report["memory_plan"]["checkpoint"] is False and report["memory_plan"]["offloaded"] == 0
    compute_scores(lm, "grad_x_weight", calib, batch_size=2, progress=False, checkpoint=True, report=report)
    assert report["memory_plan"]["checkpoint"] is True


def test_bench_accuracy_and_curvature_sections_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    common = ["--device", "cpu", "--out", str(out), "--length", "16", "--repeats", "1"]
    rc = main(
        [
            "--sections",
            "accuracy,hutchinson,hessian",
            *common,
            "--accuracy-arch",
            "tiny-llama",
            "--accuracy-windows",
            "4",
            "--score-batch",
            "2",
            "--hutchinson-archs",
            "tiny-llama",
            "--hutchinson-windows",
            "2",
            "--hessian-archs",
            "tiny-llama",
        ]
    )
    assert rc == 0
    sections = json.loads(out.read_text())["sections"]
    for name in ("accuracy", "hutchinson", "hessian"):
        assert sections[name]["errors"] == [] and sections[name]["rows"], name
    assert sections["accuracy"]["offload_bitwise_equal"] and sections["accuracy"]["rerun_bitwise_equal"]
    rows = {r["variant"]: r for r in sections["accuracy"]["rows"]}
    assert rows["esa fp32, on device"]["topk_overlap_mean"] == 1.0  # CPU: the reference is fp32 already
    variants = [r.get("variant") for r in sections["hutchinson"]["rows"]]
    assert variants[0].startswith("plain") and "esa (lean)" in variants


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["grad_x_weight", "grad_squared"])
def test_offloaded_equals_on_device_on_cuda(metric):
    """The side-stream path (pinned sums, H2D → add → D2H): bit-identical under deterministic kernels."""
    lm = load_model("tiny-llama", device="cuda")
    calib = random_windows(6, 32, lm.model.config.vocab_size, seed=3)
    args = dict(batch_size=2, progress=False, checkpoint=False)
    with deterministic():
        kept = compute_scores(lm, metric, calib, offload=False, **args)
        moved = compute_scores(lm, metric, calib, offload=True, **args)
    for n in kept:
        assert moved[n].device.type == "cpu" and kept[n].is_cuda
        assert torch.equal(moved[n], kept[n].cpu()), n
