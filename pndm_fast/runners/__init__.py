"""Runners: the only modules that touch files, progress bars and devices (training, sampling, checks)."""
