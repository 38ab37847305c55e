"""dials.util.log.config: a console and a log-file handler on the 'dials' logger."""

import logging
import sys


def config(verbosity=0, logfile=None):
    dials_logger = logging.getLogger("dials")
    console = logging.StreamHandler(sys.stdout)
    dials_logger.addHandler(console)
    if logfile:
        dials_logger.addHandler(logging.FileHandler(filename=logfile, mode="w", encoding="utf-8"))
    dials_logger.setLevel(logging.DEBUG if verbosity > 1 else logging.INFO)
    dials_logger.info("DIALS (2018) Acta Cryst. D74, 85-97. https://doi.org/10.1107/S2059798317017235")
