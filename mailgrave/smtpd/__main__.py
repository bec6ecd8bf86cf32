"""``python -m mailgrave.smtpd``: mailgrave-smtpd."""

import sys

from mailgrave.smtpd.program import main

sys.exit(main())
