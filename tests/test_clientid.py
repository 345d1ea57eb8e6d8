"""Tests for signed client ids."""

from twisted.trial.unittest import SynchronousTestCase

from mterelay.clientid import BadClientId, ClientIdSigner

OLD = "o" * 32
NEW = "n" * 32


class ClientIdTests(SynchronousTestCase):
    def test_issue_then_verify(self):
        """An issued token verifies to the same client id without re-signing."""
        signer = ClientIdSigner([NEW])
        issued = signer.issue()
        verified = signer.verify(issued.token)
        self.assertEqual((verified.client_id, verified.resigned), (issued.client_id, False))

    def test_ids_are_random(self):
        """Two issued ids differ."""
        signer = ClientIdSigner([NEW])
        self.assertNotEqual(signer.issue().client_id, signer.issue().client_id)

    def test_forged_rejected(self):
        """A token signed by an unknown secret, altered, or malformed raises BadClientId (566)."""
        signer = ClientIdSigner([NEW])
        forged = ClientIdSigner(["x" * 32]).issue().token
        altered = signer.issue().token
        altered = altered[:-1] + ("A" if altered[-1] != "A" else "B")
        for token in (forged, altered, "", "nodot", None, forged + "x"):
            with self.assertRaises(BadClientId) as ctx:
                signer.verify(token)
            self.assertEqual(ctx.exception.code, 566)

    def test_rotation_resigns_with_newest(self):
        """After rotation a token signed by the older secret is accepted and re-signed with the newest one."""
        old_token = ClientIdSigner([OLD]).issue().token
        rotated = ClientIdSigner([NEW, OLD])
        verified = rotated.verify(old_token)
        self.assertTrue(verified.resigned)
        self.assertNotEqual(verified.token, old_token)
        self.assertEqual(ClientIdSigner([NEW]).verify(verified.token).client_id, verified.client_id)

    def test_no_secret_in_repr(self):
        """The signer's repr never shows a secret."""
        self.assertNotIn(NEW, repr(ClientIdSigner([NEW])))

    def test_remembered_ids_still_checked(self):
        """A verified id is remembered, yet a different MAC for the same id is still refused, and the memory is bounded."""
        from mterelay import clientid

        signer = ClientIdSigner([NEW])
        issued = signer.issue()
        self.assertEqual(signer.verify(issued.token), issued)
        forged = issued.token[:-2] + ("AA" if not issued.token.endswith("AA") else "BB")
        self.assertRaises(BadClientId, signer.verify, forged)
        self.patch(clientid, "VERIFIED_CACHE_SIZE", 3)
        tokens = [signer.issue().token for _ in range(5)]
        self.assertEqual(len(signer._verified), 3)
        self.assertEqual([signer.verify(t).token for t in tokens], tokens)
