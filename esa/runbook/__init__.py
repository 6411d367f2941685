"""The research runbook as a library call: ``run_experiment(ExperimentConfig(...))`` and the
artifacts it writes (manifest, config, top weights, results, stability, plots)."""

from esa.runbook.config import ExperimentConfig, parse_int_list
from esa.runbook.experiment import ExperimentResult, run_experiment

__all__ = ["ExperimentConfig", "ExperimentResult", "parse_int_list", "run_experiment"]
