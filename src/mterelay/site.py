"""
The relay's site: the router with the roles that the settings switch on. ``makeService`` and the integration tests
build it the same way.
"""

from twisted.internet import task

from mterelay.clientid import ClientIdSigner
from mterelay.codec import RelayIdentity
from mterelay.inbound import Inbound
from mterelay.outbound import Outbound
from mterelay.upstream import AgentUpstreamClient
from mterelay.web import RelaySite, build_resource


def load_identity(path):
    """The relay's Ed25519 identity from the PEM file at ``path`` (IDENTITY_KEY)."""
    with open(path, "rb") as f:
        return RelayIdentity.from_pem(f.read())


def build_site(settings, reactor, agent, registry, identity, tracker=None, cooperator=task, peer_agent=None):
    """
    The relay's ``Site`` for ``settings``: the inbound role always, the outbound role when OUTBOUND_TOKEN is set.
    ``agent`` is the ``IAgent`` that reaches UPSTREAM, ``peer_agent`` the one that reaches peer relays (``agent``
    when None), ``registry`` an ``IRegistry``, ``identity`` a ``RelayIdentity``; ``cooperator`` runs the inbound
    role's body verification.
    """
    upstream = AgentUpstreamClient(agent)
    signer = ClientIdSigner(settings.client_id_secrets)
    inbound = Inbound(settings, identity, registry, upstream, reactor, signer, cooperator)
    peer_agent = agent if peer_agent is None else peer_agent
    outbound = None if settings.outbound_token is None else Outbound(settings, peer_agent, reactor)
    resource = build_resource(settings, upstream, reactor, inbound=inbound, outbound=outbound, tracker=tracker)
    return RelaySite(resource, settings, reactor)
