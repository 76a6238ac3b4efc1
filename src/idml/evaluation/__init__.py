"""Evaluation: exact kNN, retrieval metrics, uncertainty (risk-coverage) and the evaluator
that embeds a split and computes them."""
