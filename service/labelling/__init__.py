"""Labelling: from a document and a taxonomy to an annotation (prompts, annotators, the scorer interface, aggregation)."""
