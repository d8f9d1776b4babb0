"""Evaluation of the trained models. MODELS: the ones dvc.yaml's evaluate matrix runs (models/<name>)."""

MODELS = ("base", "sft", "ppo", "dpo")
