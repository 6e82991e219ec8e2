"""The sequential benchmark: config, run directory, runner, plots, report, geometry."""
