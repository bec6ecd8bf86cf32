"""``python -m mailgrave.inject``: mailgrave-inject."""

import sys

from mailgrave.inject.program import main

sys.exit(main())
