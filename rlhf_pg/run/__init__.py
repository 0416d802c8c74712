"""The shell every command shares: run directory, loop, optimizer and schedule, accelerator, checkpoints, metrics."""
