"""qgpt's tools, run from the repository root: python -m tools.study, python -m tools.bench, python -m tools.course."""
