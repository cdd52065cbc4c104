"""Stage 2 of ringbench: transfer a backbone card to downstream tasks and record the results."""
