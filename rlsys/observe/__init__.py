"""Watching runs: metrics logs, the profiling timeline, rlsys report."""
