"""``python -m mailgrave.queue``: mailgrave-queue."""

import sys

from mailgrave.queue.program import main

sys.exit(main())
