"""The administrator's command: check, queue, run (and `make run`'s development instance)."""
