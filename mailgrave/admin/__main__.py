"""``python -m mailgrave.admin``: mailgrave."""

import sys

from mailgrave.admin.cli import main

sys.exit(main())
