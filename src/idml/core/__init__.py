"""Shared basics every other layer builds on: errors, file I/O, the run folder, config,
runtime (devices, precision, seeds) and checkpoints."""
