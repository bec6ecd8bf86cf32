"""``python -m mailgrave.local``: mailgrave-local."""

import sys

from mailgrave.local.program import main

sys.exit(main())
