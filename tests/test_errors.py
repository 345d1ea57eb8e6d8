"""Tests for the relay error table."""

import json

from twisted.trial.unittest import SynchronousTestCase

from mterelay.errors import CODES, RelayError, error_table


class ErrorTableTests(SynchronousTestCase):
    def test_relay_codes_cover_559_to_569(self):
        """Every relay-specific code from 559 to 569 is defined, with the HTTP codes the relay also answers."""
        self.assertEqual(set(range(559, 570)) | {401, 403, 503}, set(CODES) & (set(range(559, 570)) | {401, 403, 503}))
        self.assertEqual([e["code"] for e in error_table()], sorted(CODES))

    def test_body_is_short_json(self):
        """A RelayError answers with a JSON body naming the error and the public detail only."""
        body = json.loads(RelayError(569, "x-mte-relay header missing").body())
        self.assertEqual(body, {"error": "missing-header", "code": 569, "message": "x-mte-relay header missing"})

    def test_unknown_code_refused(self):
        """An error code outside the table is a programming error, caught at once."""
        self.assertRaises(ValueError, RelayError, 599)
