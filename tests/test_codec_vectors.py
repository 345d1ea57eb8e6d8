"""
Test vectors: X-Wing against the draft's published vector, and the protocol vectors printed in docs/protocol.rst,
recomputed here from the inputs the document gives.

``python -m tests.test_codec_vectors`` prints a fresh vector block (new relay ciphertexts) for the document.
"""

import hashlib
import json
import pathlib
import re

import attrs
from twisted.trial.unittest import SynchronousTestCase

from mterelay.codec import (
    HEADERS,
    URL,
    ClientPairing,
    RelayHeader,
    RelayIdentity,
    RelayPairState,
    b64decode,
    b64encode,
    encode_header_block,
    encoded_length,
    relay_pair,
    request_binding,
    response_binding,
)
from mterelay.codec.pairing import signed_message, transcript_hash
from mterelay.codec.xwing import XWingPrivateKey

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.rst"
BLOCK = re.compile(r"\.\. vectors-begin\n\n\.\. code-block:: json\n\n(.*?)\n\.\. vectors-end", re.S)

INPUTS = {
    "identity_seed": bytes(range(32)).hex(),
    "client_id": "AAECAwQFBgcICQoLDA0ODw",
    "pair_id": "pair-0001-vector",
    "mke_counter": 65538,
    "method": "POST",
    "url": "/api/login?next=%C3%A9",
    "request_headers": [["content-type", "application/json"], ["x-a", "1"], ["x-a", "2"]],
    "request_body": '{"user":"alice"}',
    "status": 200,
    "response_headers": [["set-cookie", "a=1"], ["set-cookie", "b=2"]],
    "response_body": "welcome",
    "long_body_length": 131077,
    "edge_method": "GET",
    "edge_target": "/v1/items?q=1",
    "edge_status": 204,
    "edge_response_headers": [["x-b", "3"]],
    "exact_body_length": 131072,
    "streamed_status": 200,
    "streamed_pieces": ["data: 1\n\n", "data: 2\n\n"],
    "streamed_long_piece_length": 131073,
}


def _seed(label):
    return hashlib.sha256(b"mterelay vector " + label.encode("ascii")).digest()


def _next_keys(client_state, relay_state, counter):
    """Both sides' keys of the next message: (client state, creq, cresp, relay state, rreq, rresp)."""
    if client_state.encode_type == "MKE":
        client_state, creq, cresp = client_state.keys_for(counter)
    else:
        client_state, creq, cresp = client_state.advance()
    return (client_state, creq, cresp, *relay_state.keys_for(creq.counter))


def _exchange(inputs, client_state, relay_state, counter):
    """One request/response, as a client and relay would send them."""
    client_state, creq, cresp, relay_state, rreq, rresp = _next_keys(client_state, relay_state, counter)
    header = RelayHeader(client_state.client_id, client_state.pair_id, client_state.encode_type, creq.counter,
                         url=True, headers=True, body=True)
    response_header = attrs.evolve(header, url=False)
    binding = request_binding(inputs["method"].encode("ascii"), flags=header.flags)
    url = creq.seal(URL, inputs["url"].encode("ascii"), binding)
    headers = creq.seal(HEADERS, encode_header_block(_pairs(inputs["request_headers"])), binding)
    encoder = creq.body_encoder(binding)
    body = b"".join(encoder.feed(inputs["request_body"].encode("utf-8")) + encoder.finish())
    decoder = rreq.body_decoder(binding)
    if b"".join(decoder.feed(body) + decoder.finish()) != inputs["request_body"].encode("utf-8"):
        raise AssertionError("the relay does not open the request body")
    rbinding = response_binding(inputs["status"], flags=response_header.flags)
    rheaders = rresp.seal(HEADERS, encode_header_block(_pairs(inputs["response_headers"])), rbinding)
    rencoder = rresp.body_encoder(rbinding)
    rbody = b"".join(rencoder.feed(inputs["response_body"].encode("utf-8")) + rencoder.finish())
    if cresp.open(HEADERS, rheaders, rbinding) != encode_header_block(_pairs(inputs["response_headers"])):
        raise AssertionError("the client does not open the response's header block")
    return {
        "x-mte-relay": header.format(),
        "request_path": "/" + b64encode(url),
        "request_binding": binding.hex(),
        "x-mte-relay-eh": b64encode(headers),
        "request_body": body.hex(),
        "response_binding": rbinding.hex(),
        "response_x-mte-relay": response_header.format(),
        "response_x-mte-relay-eh": b64encode(rheaders),
        "response_body": rbody.hex(),
        "relay_state_after": b64encode(relay_state.to_bytes()),
    }, client_state, relay_state, creq


def _edge_exchange(inputs, client_state, relay_state, counter):
    """
    A third message that covers what the first two do not: a visible URL (bound as the target), an empty header
    block, no request body, and a bodiless response (flags 0 for body).
    """
    client_state, creq, cresp, relay_state, rreq, rresp = _next_keys(client_state, relay_state, counter)
    header = RelayHeader(client_state.client_id, client_state.pair_id, client_state.encode_type, creq.counter,
                         url=False, headers=True, body=False)
    response_header = header
    target = inputs["edge_target"].encode("ascii")
    binding = request_binding(inputs["edge_method"].encode("ascii"), target, header.flags)
    headers = creq.seal(HEADERS, encode_header_block([]), binding)
    if rreq.open(HEADERS, headers, binding) != b"[]":
        raise AssertionError("the relay does not open the edge request's header block")
    rbinding = response_binding(inputs["edge_status"], flags=response_header.flags)
    rheaders = rresp.seal(HEADERS, encode_header_block(_pairs(inputs["edge_response_headers"])), rbinding)
    if cresp.open(HEADERS, rheaders, rbinding) != encode_header_block(_pairs(inputs["edge_response_headers"])):
        raise AssertionError("the client does not open the edge response's header block")
    return {
        "x-mte-relay": header.format(),
        "request_binding": binding.hex(),
        "x-mte-relay-eh": b64encode(headers),
        "response_binding": rbinding.hex(),
        "response_x-mte-relay": response_header.format(),
        "response_x-mte-relay-eh": b64encode(rheaders),
        "relay_state_after": b64encode(relay_state.to_bytes()),
    }, client_state, relay_state, creq, (rresp, cresp)


def _streamed_body(inputs, relay_keys, client_keys):
    """
    A framed response body: ``streamed_pieces`` each fed as they would arrive, sealed with ``relay_keys`` under the
    binding of a ``streamed_status`` answer with the streaming flag; the client's keys must open it.
    """
    flags = (False, True, True, True)
    binding = response_binding(inputs["streamed_status"], flags)

    def frame(pieces):
        encoder = relay_keys.body_encoder(binding, framed=True)
        body = b"".join([item for piece in pieces for item in encoder.feed(piece)] + encoder.finish())
        decoder = client_keys.body_decoder(binding, framed=True)
        if b"".join(decoder.feed(body) + decoder.finish()) != b"".join(pieces):
            raise AssertionError("the client does not open the streamed body")
        return body

    body = frame([piece.encode("utf-8") for piece in inputs["streamed_pieces"]])
    long_body = frame([bytes(inputs["streamed_long_piece_length"])])
    return {
        "binding": binding.hex(),
        "body": body.hex(),
        "long_body_length": len(long_body),
        "long_body_sha256": hashlib.sha256(long_body).hexdigest(),
    }


def _sealed_body(keys, length):
    """A zero-filled body of ``length`` bytes sealed with ``keys`` and an empty binding: (encoded length, SHA-256)."""
    encoder = keys.body_encoder()
    body = b"".join(encoder.feed(bytes(length)) + encoder.finish())
    if len(body) != encoded_length(length):
        raise AssertionError("encoded_length disagrees with the encoder")
    return len(body), hashlib.sha256(body).hexdigest()


def _pairs(pairs):
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def compute(inputs, ciphertexts=None):
    """
    Every output of the protocol vectors from ``inputs``; ``ciphertexts`` (encode type -> base64url) are the relay's
    randomized encapsulations, made afresh when absent.
    """
    identity = RelayIdentity.from_seed(bytes.fromhex(inputs["identity_seed"]))
    out = {"inputs": inputs, "identity_public": b64encode(identity.public_bytes()),
           "identity_fingerprint": identity.fingerprint().hex()}
    for encode_type in ("MKE", "MTE"):
        key = XWingPrivateKey(_seed(encode_type))
        pairing = ClientPairing(inputs["client_id"], inputs["pair_id"], encode_type, key)
        if ciphertexts is None:
            ciphertext = relay_pair(identity, inputs["client_id"], inputs["pair_id"], encode_type, key.public_key)[1].ciphertext
        else:
            ciphertext = b64decode(ciphertexts[encode_type])
        digest = transcript_hash(encode_type, inputs["client_id"], inputs["pair_id"], key.public_key, ciphertext,
                                 identity.public_bytes())
        signature = identity.sign(signed_message(digest))
        client = pairing.finish(ciphertext, signature, identity.public_bytes(), pin=identity.fingerprint())
        relay = RelayPairState(**attrs.asdict(client))
        section = {
            "xwing_seed": _seed(encode_type).hex(),
            "public_key_sha256": hashlib.sha256(key.public_key).hexdigest(),
            "ciphertext": b64encode(ciphertext),
            "shared_secret": key.decapsulate(ciphertext).hex(),
            "transcript_hash": digest.hex(),
            "signature": b64encode(signature),
            "c2s_key": client.c2s.hex(),
            "s2c_key": client.s2c.hex(),
            "messages": [],
        }
        counters = [inputs["mke_counter"], inputs["mke_counter"] + 1] if encode_type == "MKE" else [0, 1]
        for counter in counters:
            result, client, relay, creq = _exchange(inputs, client, relay, counter)
            section["messages"].append(result)
        length, digest = _sealed_body(creq, inputs["long_body_length"])
        section["long_body_encoded_length"], section["long_body_encoded_sha256"] = length, digest
        result, client, relay, creq, response_keys = _edge_exchange(inputs, client, relay, counters[-1] + 1)
        section["edge_message"] = result
        length, digest = _sealed_body(creq, inputs["exact_body_length"])
        section["exact_body_encoded_length"], section["exact_body_encoded_sha256"] = length, digest
        section["streamed_body"] = _streamed_body(inputs, *response_keys)
        out[encode_type] = section
    return out


def documented():
    """The vector block printed in docs/protocol.rst."""
    match = BLOCK.search(DOC.read_text("utf-8"))
    return json.loads(match.group(1))


class XWingVectorTests(SynchronousTestCase):
    """The X-Wing combiner against draft-connolly-cfrg-xwing-kem-08's published vector."""

    def setUp(self):
        self.vector = json.loads((ROOT / "tests" / "vectors" / "xwing-draft-08.json").read_text("ascii"))

    def test_public_key_from_seed(self):
        """The decapsulation seed expands to the published public key."""
        key = XWingPrivateKey(bytes.fromhex(self.vector["sk"]))
        self.assertEqual(key.public_key.hex(), self.vector["pk"])

    def test_decapsulation(self):
        """The published ciphertext decapsulates to the published shared secret."""
        key = XWingPrivateKey(bytes.fromhex(self.vector["sk"]))
        self.assertEqual(key.decapsulate(bytes.fromhex(self.vector["ct"])).hex(), self.vector["ss"])


class ProtocolVectorTests(SynchronousTestCase):
    """docs/protocol.rst's vectors are what this implementation computes."""

    def test_document_vectors_recompute(self):
        """Recomputing every output from the document's inputs and ciphertexts gives the printed values."""
        printed = documented()
        ciphertexts = {t: printed[t]["ciphertext"] for t in ("MKE", "MTE")}
        self.assertEqual(compute(printed["inputs"], ciphertexts), printed)

    def test_document_inputs_are_the_suite_inputs(self):
        """The document's inputs are the ones this module defines (so the vectors cover what the suite checks)."""
        self.assertEqual(documented()["inputs"], INPUTS)


if __name__ == "__main__":
    # The relay ciphertexts already printed are kept (``--fresh``: new ones), so that the other values stay put.
    import sys

    kept = None if "--fresh" in sys.argv else {t: documented()[t]["ciphertext"] for t in ("MKE", "MTE")}
    print(json.dumps(compute(INPUTS, kept), indent=1))
