"""Induction: a taxonomy proposed from a corpus (clusters, names, review) and the diff between versions."""
