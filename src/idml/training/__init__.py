"""Training: the Trainer (step, epoch, end of epoch, finish), its resume state, the factories
that build a run's parts, and data-parallel training under torchrun."""
