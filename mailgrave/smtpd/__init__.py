"""The SMTP server stage: one process per connection (user mailgrave-smtpd, no spool access).

In systemd's ``Accept=yes`` mode every connection starts a new interpreter,
so every module a session imports is paid for on every connection.
:data:`IMPORT_BUDGET` is the whole list of modules a plain session (EHLO,
MAIL, RCPT, DATA, QUIT, with the compiled config cache; no TLS) may import
beyond what ``python3 -I -S`` starts with; tests/integration/test_smtpd_inetd.py
fails when a session imports anything else, and when this list grows without
the test being told. Everything else is imported where it is needed (argparse
for ``--help``, ssl for STARTTLS, yaml when the cache is stale, the listener's
socket and signal in the forking mode).
"""

IMPORT_BUDGET = frozenset(
    {
        "__future__",
        "_socket",  # the connection, without socket.py (enum, selectors)
        "_struct",
        "struct",  # queue.ctrl's chunk lengths
        "select",
        "pwd",  # the config cache's directory is per user
        "zlib",  # the config cache's checksum
        "mailgrave",
        "mailgrave.address",
        "mailgrave.config",
        "mailgrave.ctrl",
        "mailgrave.envelope",
        "mailgrave.errors",
        "mailgrave.fileio",
        "mailgrave.log",
        "mailgrave.maillog",
        "mailgrave.recipients",
        "mailgrave.record",
        "mailgrave.sd",
        "mailgrave.smtp",
        "mailgrave.smtp.replies",
        "mailgrave.smtp.server",
        "mailgrave.smtpd",
        "mailgrave.smtpd.program",
        "mailgrave.smtpd.session",
    }
)
