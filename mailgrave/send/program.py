"""mailgrave-send: the scheduler's program.

Started per queue event (a new entry in todo/, an administrator's request in
ctl/, or the timer), it runs :class:`mailgrave.send.scheduler.Scheduler`
under the spool's send lock, and exits when nothing is due. A second run
started while one holds the lock leaves at once: the first picks up new mail.
"""

from __future__ import annotations

import os
import signal
import sys

from mailgrave import config as configmod
from mailgrave import log as logmod
from mailgrave import privs
from mailgrave.errors import EXIT_OK, EXIT_TEMP
from mailgrave.send.scheduler import Scheduler
from mailgrave.spool import Spool
from mailgrave.stageargs import stage_parser

log = logmod.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser(
        "mailgrave-send",
        "Deliver what is due in the MailGrave spool, then exit. Started by "
        "mailgrave-send.path (new mail) and mailgrave-send.timer (retries), or by hand.",
    )
    parser.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: become NAME (and its groups) first; required as root "
        "(default: stay who we are)",
    )
    args = parser.parse_args(argv)
    logmod.setup("send", args.debug)
    config = configmod.load_or_exit(args.config, "mailgrave-send")
    privs.drop_or_exit("mailgrave-send", privs.plan_or_exit("mailgrave-send", args.user))
    spool = Spool(config.spool)
    if not os.path.isdir(spool.path("todo")):
        print(f"mailgrave-send: no spool at {config.spool}", file=sys.stderr)
        return EXIT_TEMP

    scheduler = Scheduler(config)

    def stop(_signum: int, _frame: object) -> None:
        scheduler.stopping = True

    signal.signal(signal.SIGTERM, stop)
    result = spool.with_send_lock(blocking=False, body=scheduler.run)
    if result is None:
        log.debug("another mailgrave-send is running; it will pick up new mail")
        return EXIT_OK
    return result
