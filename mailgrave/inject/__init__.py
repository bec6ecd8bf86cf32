"""Local submission with sendmail's command line (runs as the calling user)."""
