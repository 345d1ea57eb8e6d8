"""
Garbage-collector settings for a long-running relay.

CPython's cyclic collector runs a young collection every 700 allocations and a full one over every live object now
and then. A relay allocates a few hundred short-lived objects per message, and holds some 60,000 long-lived ones
from start-up (modules, classes, the codec's tables): under load a full collection took ~17 ms about every second
and the collector about 8-9% of the relay's CPU. Once the service has started, what start-up made is moved out of
the collector's reach (``gc.freeze``) and collections run less often; reference counting still frees almost
everything at once, so memory stays flat (checked by the suite's long RSS tests).
"""

import gc

from twisted.application.service import Service
from twisted.logger import Logger

log = Logger()

#: Young-generation allocations between collections, then how many of each generation before the next one's.
THRESHOLDS = (50_000, 20, 100)


class GCTuningService(Service):
    """Freezes the start-up heap and sets ``THRESHOLDS`` when started; puts the previous thresholds back on stop."""

    def __init__(self, thresholds=THRESHOLDS):
        self._thresholds = thresholds
        self._previous = None

    def startService(self):
        super().startService()
        gc.collect()
        gc.freeze()
        self._previous = gc.get_threshold()
        gc.set_threshold(*self._thresholds)
        log.debug(
            "collector: {frozen} start-up objects frozen, thresholds {thresholds}",
            frozen=gc.get_freeze_count(),
            thresholds=self._thresholds,
        )

    def stopService(self):
        if self._previous is not None:
            gc.set_threshold(*self._previous)
            gc.unfreeze()
            self._previous = None
        return super().stopService()
