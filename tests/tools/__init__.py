"""Measurements run by hand against real VMs (python -m tests.tools.NAME, or
through scripts/soak), never collected as tests."""
