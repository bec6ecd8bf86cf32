"""MailGrave: a mail transfer agent in the tradition of qmail."""

__version__ = "0.1.0"
