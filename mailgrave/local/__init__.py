"""The local delivery stage: mailboxes, aliases, .forward and commands, as the recipient.

It starts as root with only CAP_SETUID and CAP_SETGID and switches to the
recipient before it opens anything of theirs.
"""
