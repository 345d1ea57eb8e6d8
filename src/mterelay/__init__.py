"""
mterelay: a Twisted relay that end-to-end encodes HTTP traffic between two relays, or a client and a relay.
"""

__version__ = "0.1.0"
