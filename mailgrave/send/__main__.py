"""``python -m mailgrave.send``: mailgrave-send."""

import sys

from mailgrave.send.program import main

sys.exit(main())
