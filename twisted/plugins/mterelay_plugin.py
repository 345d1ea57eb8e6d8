"""The ``twistd mterelay`` plugin. Lazy: ``twistd --help`` imports only this module, not the relay."""

from twisted.application.service import ServiceMaker

mterelay = ServiceMaker(
    "mterelay",
    "mterelay.tap",
    "End-to-end encoding HTTP relay (MTE routes, pass-through routes, outbound role)",
    "mterelay",
)
