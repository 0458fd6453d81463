"""Experiment tracking (MLflow, Weights & Biases): see exporter.py."""
