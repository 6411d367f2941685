"""The research runbook as a library call: ``run_experiment(ExperimentConfig(...))`` and the
artifacts it writes (manifest, config, top weights, results, stability, plots)."""

from esa.runbook.experiment import ExperimentConfig, ExperimentResult, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "run_experiment"]
