"""Offline evaluation: tasks, metrics, the runner, plots and reports."""
