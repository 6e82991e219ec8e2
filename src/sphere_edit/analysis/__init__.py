"""Analyses of a model that help choose how to edit it (causal tracing); the editing core
does not import this package."""
