"""The scheduler stage: delivery, retries, bounces (user mailgrave-queue, owns the spool)."""
