"""Distillation: small classifiers (students) trained on a job's labels to serve the taxonomy cheaply."""
