"""The queue stage: the only writer of new messages into the spool (user mailgrave-queue)."""
