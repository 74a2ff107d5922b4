"""Prompts and where they come from: files, the dataset registry, models that install offline, toy tasks."""
