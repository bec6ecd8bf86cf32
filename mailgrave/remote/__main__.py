"""``python -m mailgrave.remote``: mailgrave-remote."""

import sys

from mailgrave.remote.program import main

sys.exit(main())
