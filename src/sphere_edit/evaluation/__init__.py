"""Evaluation: data sets, scoring, edit metrics, general abilities."""
