"""The remote delivery stage: SMTP client, routes, MX, smarthost, TLS.

User mailgrave-remote: network access, no spool writes.
"""
