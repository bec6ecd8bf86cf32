"""The SMTP server stage: one process per connection (user mailgrave-smtpd, no spool access)."""
