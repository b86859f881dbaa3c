"""Evaluation: baselines, run reports, the end-to-end demo."""
