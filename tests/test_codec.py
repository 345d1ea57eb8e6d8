"""Tests for mterelay.codec: pairing, the MKE and MTE encodings, body records, state and the x-mte-relay header."""

import json
import os
import tracemalloc

import attrs
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, NoEncryption, PrivateFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mterelay.codec import (
    HEADERS,
    MAX_HEADER_BLOCK,
    MAX_HEADER_PAIRS,
    RECORD_SIZE,
    URL,
    ClientPairing,
    CodecError,
    RelayHeader,
    RelayIdentity,
    UnencodableHeader,
    b64decode,
    b64encode,
    decode_header_block,
    decoded_length,
    encode_header_block,
    encoded_length,
    load_state,
    relay_pair,
    request_binding,
    response_binding,
)
from mterelay.codec import state as state_module
from mterelay.errors import RelayError

CLIENT = "client_id-0123456789"
PAIR = "pair_id-ABCDEFGHIJ"
SMALL = 32
fast = settings(max_examples=60, deadline=None)
TOKEN_CHARS = "!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-"
#: The bytes RFC 9110 5.5 allows in a field value: HTAB, SP, VCHAR and obs-text.
VALUE_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]
IDENTITY = RelayIdentity.generate()


def pair(encode_type="MKE", pair_id=PAIR, identity=IDENTITY):
    """A freshly paired (client state, relay state)."""
    pairing = ClientPairing.start(CLIENT, pair_id, encode_type)
    relay_state, reply = relay_pair(identity, CLIENT, pair_id, encode_type, pairing.public_key)
    return pairing.finish(reply.ciphertext, reply.signature, identity.public_bytes()), relay_state


def message(client, relay, counter=0):
    """Keys for one exchange: (client, relay, client request keys, client response keys, relay req, relay resp)."""
    if client.encode_type == "MKE":
        client, creq, cresp = client.keys_for(counter)
    else:
        client, creq, cresp = client.advance()
    relay, rreq, rresp = relay.keys_for(creq.counter)
    return client, relay, creq, cresp, rreq, rresp


def encode_body(keys, data, chunks=1, record_size=SMALL, binding=b""):
    """Encode ``data`` fed in ``chunks`` roughly equal pieces."""
    encoder = keys.body_encoder(binding, record_size)
    step = max(1, len(data) // chunks)
    pieces = [piece for i in range(0, len(data), step) for piece in encoder.feed(data[i : i + step])]
    return b"".join(pieces + encoder.finish())


def decode_body(keys, data, chunks=1, record_size=SMALL, binding=b""):
    """Decode ``data`` fed in ``chunks`` roughly equal pieces."""
    decoder = keys.body_decoder(binding, record_size)
    step = max(1, len(data) // chunks)
    pieces = [piece for i in range(0, len(data), step) for piece in decoder.feed(data[i : i + step])]
    return b"".join(pieces + decoder.finish())


class CodeAssertions:
    """``assertCode``: a call raises a CodecError carrying a given relay code."""

    def assertCode(self, expected, f, *args, **kwargs):
        error = self.assertRaises(CodecError, f, *args, **kwargs)
        self.assertEqual(error.code, expected)
        self.assertIsInstance(error, RelayError)
        return error


class PairingTests(CodeAssertions, SynchronousTestCase):
    """Pairing: X-Wing, the relay signature, pins and input checks."""

    def test_both_sides_derive_the_same_keys(self):
        """A paired client's request opens at the relay and the relay's response opens at the client."""
        for encode_type in ("MKE", "MTE"):
            client, relay = pair(encode_type)
            _, _, creq, cresp, rreq, rresp = message(client, relay)
            self.assertEqual(rreq.open(URL, creq.seal(URL, b"/a?b=c")), b"/a?b=c")
            self.assertEqual(cresp.open(HEADERS, rresp.seal(HEADERS, b"[]")), b"[]")

    def test_pin_accepts_raw_key_and_fingerprint(self):
        """Pinning the identity's raw key or its fingerprint both succeed."""
        for pin in (IDENTITY.public_bytes(), IDENTITY.fingerprint()):
            pairing = ClientPairing.start(CLIENT, PAIR, "MKE")
            _, reply = relay_pair(IDENTITY, CLIENT, PAIR, "MKE", pairing.public_key)
            state = pairing.finish(reply.ciphertext, reply.signature, IDENTITY.public_bytes(), pin=pin)
            self.assertEqual(state.position, 0)

    def test_wrong_pin_fails(self):
        """A relay whose identity does not match the pin is refused with 565."""
        other = RelayIdentity.generate()
        pairing = ClientPairing.start(CLIENT, PAIR, "MKE")
        _, reply = relay_pair(other, CLIENT, PAIR, "MKE", pairing.public_key)
        self.assertCode(
            565, pairing.finish, reply.ciphertext, reply.signature, other.public_bytes(), pin=IDENTITY.fingerprint()
        )

    def test_substituted_identity_fails(self):
        """A signature by one identity presented with another identity's key is refused with 565."""
        pairing = ClientPairing.start(CLIENT, PAIR, "MKE")
        _, reply = relay_pair(RelayIdentity.generate(), CLIENT, PAIR, "MKE", pairing.public_key)
        self.assertCode(565, pairing.finish, reply.ciphertext, reply.signature, IDENTITY.public_bytes())

    def test_transcript_mismatch_fails(self):
        """A reply made for another pair id, type or client id (or a flipped ciphertext) fails the signature."""
        pairing = ClientPairing.start(CLIENT, PAIR, "MKE")
        for client_id, pair_id, encode_type in [
            (CLIENT, PAIR + "x", "MKE"),
            (CLIENT, PAIR, "MTE"),
            (CLIENT + "x", PAIR, "MKE"),
        ]:
            _, reply = relay_pair(IDENTITY, client_id, pair_id, encode_type, pairing.public_key)
            self.assertCode(565, pairing.finish, reply.ciphertext, reply.signature, IDENTITY.public_bytes())
        _, reply = relay_pair(IDENTITY, CLIENT, PAIR, "MKE", pairing.public_key)
        flipped = bytes([reply.ciphertext[0] ^ 1]) + reply.ciphertext[1:]
        self.assertCode(565, pairing.finish, flipped, reply.signature, IDENTITY.public_bytes())
        self.assertCode(565, pairing.finish, reply.ciphertext[:-1], reply.signature, IDENTITY.public_bytes())

    def test_bad_pairing_input_is_typed(self):
        """Bad ids and public keys give 565, an unknown encode type 568."""
        key = ClientPairing.start(CLIENT, PAIR, "MKE").public_key
        self.assertCode(565, relay_pair, IDENTITY, "short", PAIR, "MKE", key)
        self.assertCode(565, relay_pair, IDENTITY, CLIENT, "bad pair id with spaces", "MKE", key)
        self.assertCode(568, relay_pair, IDENTITY, CLIENT, PAIR, "XYZ", key)
        self.assertCode(565, relay_pair, IDENTITY, CLIENT, PAIR, "MKE", key[:-1])
        self.assertCode(565, relay_pair, IDENTITY, CLIENT, PAIR, "MKE", b"\xff" * len(key))
        self.assertCode(565, ClientPairing.start, CLIENT, "x", "MKE")

    def test_each_pairing_has_its_own_keys(self):
        """Two pairings with the same ids produce keys that cannot open each other's items."""
        first = message(*pair())[2]
        second = message(*pair())[4]
        self.assertCode(562, second.open, URL, first.seal(URL, b"/"))


class IdentityTests(SynchronousTestCase):
    """The relay identity: PEM round trip and a secret-free repr."""

    def test_pem_round_trip(self):
        """An identity saved as PEM loads back with the same public key and signs verifiably."""
        loaded = RelayIdentity.from_pem(IDENTITY.to_pem())
        self.assertEqual(loaded.public_bytes(), IDENTITY.public_bytes())
        self.assertEqual(b64decode(loaded.public_b64()), IDENTITY.public_bytes())

    def test_other_key_types_refused(self):
        """A PEM holding a non-Ed25519 key is refused."""
        pem = generate_private_key(SECP256R1()).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        self.assertRaises(ValueError, RelayIdentity.from_pem, pem)

    def test_encrypted_key_refused(self):
        """An Ed25519 PEM encrypted with a password is a ValueError saying so (the relay cannot ask for one), not the
        TypeError cryptography raises, which the relay's configuration check would let through as a traceback."""
        pem = IDENTITY._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pw"))
        with self.assertRaises(ValueError) as caught:
            RelayIdentity.from_pem(pem)
        self.assertIn("encrypted", str(caught.exception))

    def test_repr_shows_no_secret(self):
        """The repr holds neither the PEM nor the raw private key."""
        text = repr(IDENTITY)
        self.assertIn(IDENTITY.fingerprint()[:8].hex(), text)
        self.assertNotIn("PRIVATE", text)
        self.assertNotIn(IDENTITY._key.private_bytes_raw().hex()[:16], text)


class ItemTests(CodeAssertions, SynchronousTestCase):
    """The url and header-block items: round trip, bit flips and splices."""

    @fast
    @given(st.binary(max_size=300), st.sampled_from(["MKE", "MTE"]), st.binary(max_size=40))
    def test_round_trip(self, plaintext, encode_type, binding):
        """Any item seals and opens back, in both directions."""
        _, _, creq, cresp, rreq, rresp = message(*PAIRS[encode_type])
        for kind in (URL, HEADERS):
            self.assertEqual(rreq.open(kind, creq.seal(kind, plaintext, binding), binding), plaintext)
            self.assertEqual(cresp.open(kind, rresp.seal(kind, plaintext, binding), binding), plaintext)

    def test_every_bit_flip_rejected(self):
        """Flipping any single bit of a sealed item makes it fail with 562."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        sealed = creq.seal(HEADERS, b'[["a","b"]]', b"bind")
        for i in range(len(sealed) * 8):
            flipped = bytearray(sealed)
            flipped[i // 8] ^= 1 << (i % 8)
            self.assertCode(562, rreq.open, HEADERS, bytes(flipped), b"bind")

    def test_splices_rejected(self):
        """An item opened under another counter, pair, direction, kind or binding fails with 562."""
        client, relay = pair()
        _, _, creq, cresp, rreq, rresp = message(client, relay, 5)
        other_counter = message(client, relay, 6)[4]
        other_pair = message(*pair(pair_id=PAIR + "2"))[4]
        sealed = creq.seal(URL, b"/x", b"GET")
        self.assertEqual(rreq.open(URL, sealed, b"GET"), b"/x")
        self.assertCode(562, other_counter.open, URL, sealed, b"GET")
        self.assertCode(562, other_pair.open, URL, sealed, b"GET")
        self.assertCode(562, cresp.open, URL, sealed, b"GET")
        self.assertCode(562, rreq.open, HEADERS, sealed, b"GET")
        self.assertCode(562, rreq.open, URL, sealed, b"PUT")
        self.assertCode(562, rreq.open, URL, sealed[:-1], b"GET")

    def test_mke_and_mte_keys_differ(self):
        """A type confusion (MKE item read as MTE of a pair with the same id) fails."""
        mke = message(*pair("MKE"))[2]
        mte = message(*pair("MTE"))[4]
        self.assertCode(562, mte.open, URL, mke.seal(URL, b"/"))

    def test_bindings_are_distinct(self):
        """Request bindings distinguish method and visible target; response bindings distinguish status."""
        bindings = {
            request_binding(b"GET"),
            request_binding(b"GET", b""),
            request_binding(b"GET", b"/a"),
            request_binding(b"GE", b"T/a"),
            request_binding(b"POST", b"/a"),
            response_binding(200),
            response_binding(404),
        }
        self.assertEqual(len(bindings), 7)


class BodyTests(CodeAssertions, SynchronousTestCase):
    """Streamed body records."""

    @fast
    @given(st.binary(max_size=5 * SMALL), st.integers(1, 7), st.integers(1, 7), st.sampled_from(["MKE", "MTE"]))
    def test_round_trip_any_chunking(self, data, in_chunks, out_chunks, encode_type):
        """A body encoded and decoded in any chunking comes back whole and has the predicted length."""
        _, _, creq, _, rreq, _ = message(*PAIRS[encode_type])
        encoded = encode_body(creq, data, in_chunks)
        self.assertEqual(len(encoded), encoded_length(len(data), SMALL))
        self.assertEqual(decoded_length(len(encoded), SMALL), len(data))
        self.assertEqual(decode_body(rreq, encoded, out_chunks), data)

    def test_default_record_size(self):
        """A 400 kB body (three full records and a final one) round-trips with the protocol's 128 KiB records."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        data = bytes(range(256)) * 1600
        encoded = encode_body(creq, data, 3, record_size=131072)
        self.assertEqual(len(encoded), encoded_length(len(data)))
        self.assertEqual(len(encoded), len(data) + 4 * 16)
        self.assertEqual(decode_body(rreq, encoded, 5, record_size=131072), data)

    @fast
    @given(st.binary(min_size=1, max_size=4 * SMALL), st.data())
    def test_single_bit_flip_rejected(self, data, draw):
        """A single flipped bit anywhere in an encoded body fails with 562 and yields no bad plaintext."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        encoded = bytearray(encode_body(creq, data))
        bit = draw.draw(st.integers(0, len(encoded) * 8 - 1))
        encoded[bit // 8] ^= 1 << (bit % 8)
        decoder = rreq.body_decoder(b"", SMALL)
        out = []
        with self.assertRaises(CodecError) as caught:
            out += decoder.feed(bytes(encoded))
            out += decoder.finish()
        self.assertEqual(caught.exception.code, 562)
        self.assertTrue(data.startswith(b"".join(out)))

    def test_every_bit_flip_rejected(self):
        """Exhaustively, every bit flip of a three-record body fails."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MTE"])
        encoded = encode_body(creq, bytes(range(2 * SMALL + 3)))
        for i in range(len(encoded) * 8):
            flipped = bytearray(encoded)
            flipped[i // 8] ^= 1 << (i % 8)
            self.assertCode(562, decode_body, rreq, bytes(flipped))

    def test_truncation_rejected(self):
        """Every proper prefix of an encoded body fails at finish, including cuts at record boundaries."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        encoded = encode_body(creq, bytes(3 * SMALL))
        for cut in range(len(encoded)):
            self.assertCode(562, decode_body, rreq, encoded[:cut])

    def test_no_whole_body_before_its_end_opened(self):
        """
        A body cut at a record boundary and given a forged final record: before ``finish`` fails, the decoder has
        released less than every record it opened, so a reader told (by a forged length) to expect exactly those
        records never holds them all; a genuine end releases the held record.
        """
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        data = os.urandom(3 * SMALL + 7)
        encoded = encode_body(creq, data)
        cut = encoded[: 3 * (SMALL + 16)] + bytes(16)
        for chunks in (1, 3, 40):
            decoder = rreq.body_decoder(b"", SMALL)
            step = max(1, len(cut) // chunks)
            released = b"".join(p for i in range(0, len(cut), step) for p in decoder.feed(cut[i : i + step]))
            self.assertEqual(released, data[: 2 * SMALL], chunks)
            self.assertCode(562, decoder.finish)
            decoder = rreq.body_decoder(b"", SMALL)
            released = b"".join(p for i in range(0, len(encoded), step) for p in decoder.feed(encoded[i : i + step]))
            self.assertEqual(released + b"".join(decoder.finish()), data, chunks)

    def test_reordered_dropped_and_foreign_records_rejected(self):
        """Swapped, dropped, duplicated or foreign records and trailing bytes fail with 562."""
        client, relay = pair()
        _, _, creq, _, rreq, _ = message(client, relay, 1)
        other = message(client, relay, 2)[2]
        step = SMALL + 16
        encoded = encode_body(creq, bytes(range(2 * SMALL + 5)))
        records = [encoded[i : i + step] for i in range(0, len(encoded), step)]
        foreign = encode_body(other, bytes(range(2 * SMALL + 5)))
        for bad in (
            records[1] + records[0] + records[2],
            records[0] + records[2],
            records[0] + records[0] + records[1] + records[2],
            foreign[:step] + b"".join(records[1:]),
            encoded + b"\x00",
        ):
            self.assertCode(562, decode_body, rreq, bad)

    def test_binding_mismatch_rejected(self):
        """A body encoded for one request binding does not decode under another."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        encoded = encode_body(creq, b"hello", binding=request_binding(b"POST", b"/a"))
        self.assertCode(562, decode_body, rreq, encoded, binding=request_binding(b"PUT", b"/a"))

    def test_output_is_whole_records(self):
        """Each piece the encoder gives is one whole record and each piece the decoder gives one record's plaintext."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        data = bytes(range(256))
        encoder = creq.body_encoder(b"", SMALL)
        sealed = encoder.feed(data[:50]) + encoder.feed(data[50:]) + encoder.finish()
        self.assertEqual([len(piece) for piece in sealed], [SMALL + 16] * 8 + [16])
        self.assertTrue(all(type(piece) is bytes for piece in sealed))
        decoder = rreq.body_decoder(b"", SMALL)
        opened = decoder.feed(b"".join(sealed)) + decoder.finish()
        self.assertEqual([len(piece) for piece in opened], [SMALL] * 8 + [0])
        self.assertEqual(b"".join(opened), data)

    def test_mutable_input_buffer_reused_by_caller(self):
        """A caller may refill its bytearray after a feed: the part held for the next record is not changed by it."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        data = os.urandom(3 * SMALL + 5)
        encoded = encode_body(creq, data)
        for transform, source, expected in (
            (creq.body_encoder(b"", SMALL), data, encoded),
            (rreq.body_decoder(b"", SMALL), encoded, data),
        ):
            buffer = bytearray(SMALL + 7)
            out = []
            for start in range(0, len(source), len(buffer)):
                piece = source[start : start + len(buffer)]
                buffer[: len(piece)] = piece
                out += transform.feed(memoryview(buffer)[: len(piece)])
                buffer[:] = bytes(len(buffer))
            self.assertEqual(b"".join(out + transform.finish()), expected)

    def test_small_feeds_hold_little_memory(self):
        """A body fed a byte at a time keeps about one record in memory, not a piece of bookkeeping per feed."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        data = os.urandom(RECORD_SIZE - 1)
        encoder = creq.body_encoder()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        out = [piece for i in range(len(data)) for piece in encoder.feed(data[i : i + 1])]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertEqual(out, [])
        self.assertLess(peak, 4 * RECORD_SIZE)
        decoder = rreq.body_decoder()
        self.assertEqual(b"".join(decoder.feed(b"".join(encoder.finish())) + decoder.finish()), data)

    def test_network_reads_are_not_copied_while_held(self):
        """Immutable reads of a sizeable part of a record are held as they are: only the record's join copies them."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        data = os.urandom(RECORD_SIZE + 5)
        reads = [data[i : i + RECORD_SIZE // 4] for i in range(0, len(data), RECORD_SIZE // 4)]
        encoder = creq.body_encoder()
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        held = [encoder.feed(read) for read in reads[:3]]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertEqual(held, [[], [], []])
        self.assertLess(peak, RECORD_SIZE // 8)
        sealed = b"".join(encoder.feed(reads[3]) + encoder.feed(reads[4]) + encoder.finish())
        self.assertEqual(sealed, encode_body(creq, data, 1, RECORD_SIZE))
        decoder = rreq.body_decoder()
        self.assertEqual(b"".join(decoder.feed(sealed) + decoder.finish()), data)

    def test_stream_unusable_after_failure_or_finish(self):
        """A decoder that failed, or an encoder that finished, refuses further input."""
        _, _, creq, _, rreq, _ = message(*PAIRS["MKE"])
        decoder = rreq.body_decoder(b"", SMALL)
        self.assertCode(562, decoder.feed, bytes(SMALL + 16))
        self.assertCode(562, decoder.feed, b"")
        self.assertCode(562, decoder.finish)
        encoder = creq.body_encoder(b"", SMALL)
        encoder.finish()
        self.assertCode(562, encoder.finish)

    def test_impossible_encoded_length(self):
        """Encoded lengths that no body produces are refused by decoded_length."""
        for length in (0, 15, SMALL + 16, SMALL + 16 + 15):
            self.assertCode(562, decoded_length, length, SMALL)


def framed(keys, pieces, record_size=SMALL, binding=b""):
    """The framed body of ``pieces`` (one ``feed`` each): the encoder's output items joined."""
    encoder = keys.body_encoder(binding, record_size, framed=True)
    return b"".join([item for piece in pieces for item in encoder.feed(piece)] + encoder.finish())


def unframe(keys, data, chunks=1, record_size=SMALL, binding=b""):
    """Decode a framed body fed in ``chunks`` roughly equal pieces."""
    decoder = keys.body_decoder(binding, record_size, framed=True)
    step = max(1, len(data) // chunks)
    pieces = [piece for i in range(0, len(data), step) for piece in decoder.feed(data[i : i + step])]
    return b"".join(pieces + decoder.finish())


class FramedBodyTests(CodeAssertions, SynchronousTestCase):
    """Framed body records: a response body with the streaming flag, released as it arrives."""

    @fast
    @given(st.lists(st.binary(max_size=3 * SMALL), max_size=6), st.integers(1, 9), st.sampled_from(["MKE", "MTE"]))
    def test_round_trip_any_pieces_and_chunking(self, pieces, out_chunks, encode_type):
        """Any sequence of feeds, framed and decoded in any chunking, comes back whole."""
        _, _, _, cresp, _, rresp = message(*PAIRS[encode_type])
        self.assertEqual(unframe(cresp, framed(rresp, pieces), out_chunks), b"".join(pieces))

    def test_each_feed_goes_out_at_once(self):
        """
        Every feed is sealed at once however small (an event stream is never held back for a full record), cut in
        records of at most the record size; the decoder releases each record as soon as its frame is complete.
        """
        _, _, _, cresp, _, rresp = message(*PAIRS["MKE"])
        encoder = rresp.body_encoder(b"", SMALL, framed=True)
        decoder = cresp.body_decoder(b"", SMALL, framed=True)
        for piece in (b"data: 1\n\n", b"x", os.urandom(2 * SMALL + 1)):
            sealed = b"".join(encoder.feed(piece))
            self.assertEqual(len(sealed), len(piece) + 21 * -(-len(piece) // SMALL))
            self.assertEqual(b"".join(decoder.feed(sealed[:-1])) + b"".join(decoder.feed(sealed[-1:])), piece)
        self.assertEqual(encoder.feed(b""), [])
        self.assertEqual(decoder.feed(b"".join(encoder.finish())), [b""])
        self.assertEqual(decoder.finish(), [])

    def test_every_bit_flip_rejected(self):
        """Exhaustively, every bit flip of a framed body (frame heads included) fails with 562."""
        _, _, _, cresp, _, rresp = message(*PAIRS["MTE"])
        encoded = framed(rresp, [b"abc", bytes(range(SMALL + 3))])
        for i in range(len(encoded) * 8):
            flipped = bytearray(encoded)
            flipped[i // 8] ^= 1 << (i % 8)
            self.assertCode(562, unframe, cresp, bytes(flipped))

    def test_truncated_and_extended_streams_rejected(self):
        """Every proper prefix fails (at finish at the latest), and so does anything after the final record."""
        _, _, _, cresp, _, rresp = message(*PAIRS["MKE"])
        encoded = framed(rresp, [b"one", b"two", bytes(SMALL)])
        for cut in range(len(encoded)):
            self.assertCode(562, unframe, cresp, encoded[:cut])
        for extra in (b"\x00", encoded[:21]):
            self.assertCode(562, unframe, cresp, encoded + extra)

    def test_reordered_dropped_foreign_and_fixed_records_rejected(self):
        """
        Swapped, dropped or duplicated frames, a frame of another message, and the same body in fixed records fail:
        record index and final flag are in the nonce, the message in the key.
        """
        client, relay = pair()
        _, _, _, cresp, _, rresp = message(client, relay, 1)
        other = message(client, relay, 2)[5]
        one, two = framed(rresp, [b"one"])[:-21], framed(rresp, [b"one", b"two"])[24:-21]
        end = framed(rresp, [b"one", b"two"])[-21:]
        foreign = framed(other, [b"one", b"two"])
        for bad in (
            two + one + end,
            one + end,
            one + one + two + end,
            foreign[:24] + two + end,
            encode_body(rresp, b"onetwo"),
        ):
            self.assertCode(562, unframe, cresp, bad)

    def test_impossible_frame_heads_rejected_before_waiting(self):
        """
        A frame head with a final flag other than 0/1, a length beyond a record, or an empty non-final record is
        refused as soon as its five bytes are in: the decoder never waits for (or holds) more than one record.
        """
        _, _, _, cresp, _, _ = message(*PAIRS["MKE"])
        for head in (b"\x02\x00\x00\x00\x11", b"\x00\x00\x00\x00\x10", (SMALL + 17).to_bytes(5, "big"),
                     b"\x01\x00\x00\x00\x0f", b"\x00\xff\xff\xff\xff"):
            decoder = cresp.body_decoder(b"", SMALL, framed=True)
            self.assertCode(562, decoder.feed, head)
            self.assertCode(562, decoder.feed, b"")

    def test_fed_a_byte_at_a_time_from_a_reused_buffer(self):
        """A framed body fed a byte at a time through one reused bytearray (as a reader refilling its buffer) opens
        whole: what the decoder keeps of an incomplete frame is its own copy."""
        _, _, _, cresp, _, rresp = message(*PAIRS["MTE"])
        data = os.urandom(2 * SMALL + 5)
        encoded = framed(rresp, [data[:7], data[7:]])
        decoder = cresp.body_decoder(b"", SMALL, framed=True)
        buffer = bytearray(1)
        out = []
        for byte in encoded:
            buffer[0] = byte
            out += decoder.feed(memoryview(buffer))
        self.assertEqual(b"".join(out + decoder.finish()), data)

    def test_small_feeds_hold_little_memory(self):
        """A frame fed a byte at a time (as a man in the middle may re-chunk it) keeps about one frame in memory, not
        an object per feed."""
        _, _, _, cresp, _, rresp = message(*PAIRS["MKE"])
        data = os.urandom(RECORD_SIZE)
        encoded = framed(rresp, [data], RECORD_SIZE)
        decoder = cresp.body_decoder(framed=True)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        out = [piece for i in range(len(encoded) - 21) for piece in decoder.feed(encoded[i : i + 1])]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        self.assertLess(peak, 4 * RECORD_SIZE)
        self.assertEqual(b"".join(out + decoder.feed(encoded[-21:]) + decoder.finish()), data)

    def test_binding_mismatch_rejected(self):
        """A framed body sealed for one response binding does not open under another."""
        _, _, _, cresp, _, rresp = message(*PAIRS["MKE"])
        encoded = framed(rresp, [b"hello"], binding=response_binding(200))
        self.assertCode(562, unframe, cresp, encoded, binding=response_binding(201))


class WindowTests(CodeAssertions, SynchronousTestCase):
    """MKE epochs and the receive window; MTE ordering; exhaustion."""

    def test_epochs_advance_and_erase(self):
        """A later epoch moves the window, keeps one epoch back and drops older keys."""
        size = state_module.EPOCH_SIZE
        client, relay = pair("MKE")
        relay2 = message(client, relay, 3 * size)[1]
        self.assertEqual(relay2.position, 3)
        for counter in (3 * size - 1, 2 * size, 3 * size, 4 * size):
            message(client, relay2, counter)
        self.assertCode(563, relay2.keys_for, 2 * size - 1)
        self.assertCode(563, relay2.keys_for, 0)
        relay3 = relay2.keys_for(5 * size)[0]
        self.assertCode(563, relay3.keys_for, 3 * size)

    def test_keys_match_across_epochs(self):
        """Client and relay derive the same message keys whatever epoch path they took."""
        size = state_module.EPOCH_SIZE
        client, relay = pair("MKE")
        client = client.keys_for(2 * size)[0]
        for counter in (2 * size + 7, 3 * size, 9 * size + 1):
            client, relay, creq, _, rreq, _ = message(client, relay, counter)
            self.assertEqual(rreq.open(URL, creq.seal(URL, b"/p")), b"/p")

    def test_jump_and_range_limits(self):
        """Counters too far ahead give 563, beyond the last epoch 564, out of 64-bit range 563."""
        size = state_module.EPOCH_SIZE
        _, relay = pair("MKE")
        self.assertCode(563, relay.keys_for, (state_module.MAX_EPOCH_JUMP + 1) * size)
        self.assertCode(564, relay.keys_for, state_module.MAX_EPOCHS * size)
        self.assertCode(563, relay.keys_for, -1)
        self.assertCode(563, relay.keys_for, 1 << 64)

    def test_mte_strict_order(self):
        """MTE: a message decodes only at the relay's current step; replays and skips give 563."""
        client, relay = pair("MTE")
        client, relay, creq, _, rreq, _ = message(client, relay)
        self.assertCode(563, relay.keys_for, 0)
        self.assertCode(563, relay.keys_for, 2)
        client2, relay2, creq2, _, rreq2, _ = message(client, relay)
        self.assertEqual(creq2.counter, 1)
        self.assertCode(562, rreq2.open, URL, creq.seal(URL, b"/"))

    def test_mte_exhausted(self):
        """An MTE state at its last step refuses with 564."""
        client, relay = pair("MTE")
        last = state_module.MAX_STEPS
        self.assertCode(564, attrs.evolve(relay, position=last).keys_for, last)
        self.assertCode(564, attrs.evolve(client, position=last).advance)

    def test_wrong_method_for_type(self):
        """Clients use keys_for for MKE and advance for MTE only."""
        self.assertRaises(TypeError, PAIRS["MTE"][0].keys_for, 0)
        self.assertRaises(TypeError, PAIRS["MKE"][0].advance)


class StateTests(CodeAssertions, SynchronousTestCase):
    """Serialization of pair states."""

    @fast
    @given(st.lists(st.integers(0, 3 * state_module.EPOCH_SIZE), min_size=1, max_size=6), st.integers(0, 5))
    def test_restore_continues_mke(self, counters, cut):
        """Saving and restoring both states mid-stream continues the same MKE stream."""
        client, relay = PAIRS["MKE"]
        for i, counter in enumerate(sorted(counters)):
            if i == cut:
                client, relay = load_state(client.to_bytes()), load_state(relay.to_bytes())
            client, relay, creq, cresp, rreq, rresp = message(client, relay, counter)
            self.assertEqual(rreq.open(URL, creq.seal(URL, b"%d" % counter)), b"%d" % counter)
            self.assertEqual(cresp.open(URL, rresp.seal(URL, b"r")), b"r")

    def test_restore_continues_mte(self):
        """Saving and restoring both states continues the MTE ratchet at the same step."""
        client, relay = pair("MTE")
        for step in range(4):
            client, relay = load_state(client.to_bytes()), load_state(relay.to_bytes())
            self.assertEqual(client.position, step)
            client, relay, creq, _, rreq, _ = message(client, relay)
            self.assertEqual(rreq.open(URL, creq.seal(URL, b"/")), b"/")

    def test_round_trip_and_roles(self):
        """to_bytes/load_state is the identity and keeps the role."""
        for state in (*PAIRS["MKE"], *PAIRS["MTE"], message(*PAIRS["MKE"], 3 * state_module.EPOCH_SIZE)[1]):
            loaded = load_state(state.to_bytes())
            self.assertEqual(loaded, state)
            self.assertIs(type(loaded), type(state))

    @fast
    @given(st.binary(max_size=220))
    def test_garbage_is_typed(self, data):
        """Arbitrary bytes either load as a state or raise 560, never anything else."""
        try:
            state = load_state(data)
        except CodecError as error:
            self.assertEqual(error.code, 560)
        else:
            self.assertEqual(state.to_bytes(), data)

    def test_positions_beyond_the_schedule_rejected(self):
        """A stored MKE epoch of MAX_EPOCHS or more, or an MTE step beyond MAX_STEPS, is no state the codec writes:
        560, not keys of an exhausted pair."""
        limits = ((PAIRS["MKE"][1], state_module.MAX_EPOCHS), (PAIRS["MTE"][1], state_module.MAX_STEPS + 1))
        for state, position in limits:
            data = attrs.evolve(state, position=position).to_bytes()
            self.assertCode(560, load_state, data)
            self.assertEqual(load_state(attrs.evolve(state, position=position - 1).to_bytes()).position, position - 1)

    def test_mangled_states_rejected(self):
        """Truncated, extended or re-versioned states raise 560."""
        data = PAIRS["MKE"][1].to_bytes()
        for bad in (data[:-1], data + b"\x00", b"\x02" + data[1:], data[:1] + b"\x09" + data[2:], b""):
            self.assertCode(560, load_state, bad)

    def test_repr_shows_no_secret(self):
        """State and keys reprs hold no key material."""
        state = message(*PAIRS["MKE"], 2 * state_module.EPOCH_SIZE)[1]
        text = repr(state) + repr(message(*PAIRS["MKE"])[2])
        for secret in (state.c2s, state.s2c, state.prev_c2s, state.prev_s2c):
            self.assertNotIn(secret.hex()[:12], text)
            self.assertNotIn(repr(secret)[2:14], text)


HEADER = RelayHeader(CLIENT, PAIR, "MKE", 42, url=True, headers=True, body=False, streaming=True)


class HeaderTests(CodeAssertions, SynchronousTestCase):
    """The x-mte-relay header and the plain header block."""

    @fast
    @given(
        st.sampled_from(["MKE", "MTE"]),
        st.integers(0, (1 << 64) - 1),
        st.lists(st.booleans(), min_size=4, max_size=4),
    )
    def test_round_trip(self, encode_type, counter, flags):
        """format() then parse() gives the same header, also from bytes."""
        header = RelayHeader(CLIENT, PAIR, encode_type, counter, *flags)
        self.assertEqual(RelayHeader.parse(header.format()), header)
        self.assertEqual(RelayHeader.parse(header.format().encode("ascii")), header)

    def test_format_is_the_documented_list(self):
        """The value is the comma list version,client,pair,type,counter,url,headers,body,streaming."""
        self.assertEqual(HEADER.format(), f"1,{CLIENT},{PAIR},MKE,42,1,1,0,1")
        self.assertEqual(RelayHeader.parse(f" 1, {CLIENT},{PAIR} ,MKE,42,1,1,0,1"), HEADER)

    def test_malformed_values_rejected(self):
        """Each malformed field raises 569, an unknown version or type 568, given as text or as header bytes."""
        good = HEADER.format().split(",")
        cases = {
            569: [(4, "042"), (4, "-1"), (4, str(1 << 64)), (4, "x"), (5, "2"), (8, ""), (1, "short"), (2, "a b" * 8)],
            568: [(0, "2"), (3, "XYZ"), (3, "mke")],
        }
        for code, edits in cases.items():
            for index, value in edits:
                fields = list(good)
                fields[index] = value
                self.assertCode(code, RelayHeader.parse, ",".join(fields))
                self.assertCode(code, RelayHeader.parse, ",".join(fields).encode("ascii"))
        for value in ("", ",".join(good[:8]), ",".join(good + ["0"]), "x" * 500, None, "v1," + ",".join(good[1:])):
            self.assertCode(569, RelayHeader.parse, value)
            if value is not None:
                self.assertCode(569, RelayHeader.parse, value.encode("ascii"))

    @fast
    @given(st.binary(max_size=120))
    def test_bytes_parse_as_their_text(self, value):
        """A header value given as bytes parses to what its text parses to, or fails with the same code."""
        try:
            expected = RelayHeader.parse(value.decode("ascii", "replace"))
        except CodecError as error:
            self.assertCode(error.code, RelayHeader.parse, value)
        else:
            self.assertEqual(RelayHeader.parse(value), expected)

    @fast
    @given(st.text(max_size=120))
    def test_arbitrary_text_is_typed(self, value):
        """Arbitrary text parses or raises 568/569, never anything else."""
        try:
            RelayHeader.parse(value)
        except CodecError as error:
            self.assertIn(error.code, (568, 569))

    @fast
    @given(
        st.lists(
            st.tuples(
                st.text(TOKEN_CHARS, min_size=1, max_size=20).map(str.encode),
                st.lists(st.sampled_from(VALUE_BYTES), max_size=40).map(bytes),
            ),
            max_size=10,
        )
    )
    def test_header_block_round_trip(self, pairs):
        """Any list of header pairs (token names, values of any bytes RFC 9110 allows: HTAB, SP, VCHAR, obs-text),
        repeated names included, survives the header block."""
        self.assertEqual(decode_header_block(encode_header_block(pairs)), pairs)

    def test_header_block_refuses_what_could_split_headers(self):
        """Names that are not tokens and values with CR, LF, NUL or any other control character raise 562 when
        opened (no opened block can forge a header or hand the upstream a head its parser refuses), and are refused
        when sealing, naming the header but not its value (the sender learns why instead of getting a 562)."""
        for pairs in (
            [(b"x: y", b"v")],
            [(b"x y", b"v")],
            [(b"x", b"a\r\nb: c-secret")],
            [(b"x", b"a\nb-secret")],
            [(b"x", b"\x00")],
            [(b"x", b"a\x0bb")],
            [(b"x", b"a\x01")],
            [(b"x", b"\x7f")],
        ):
            block = json.dumps([[n.decode("latin-1"), v.decode("latin-1")] for n, v in pairs]).encode()
            self.assertCode(562, decode_header_block, block)
            with self.assertRaises(UnencodableHeader) as caught:
                encode_header_block(pairs)
            self.assertIn(pairs[0][0].decode()[:1], str(caught.exception))
            self.assertNotIn("secret", str(caught.exception))
        self.assertCode(562, decode_header_block, b"[" * 100000)

    def test_header_block_garbage_rejected(self):
        """Non-JSON, wrong shapes and oversize blocks raise 562."""
        for bad in (
            b"",
            b"{}",
            b'[["a"]]',
            b'[["a","b","c"]]',
            b'[[1,"b"]]',
            b'[["","b"]]',
            b"\xff",
            b'[["\\u0100","b"]]',
            '[["a","b"]]'.encode("utf-16"),
            b"\xef\xbb\xbf" + b'[["a","b"]]',
            b'[["a","b"]' + b',["a","b"]' * 256 + b"]",
        ):
            self.assertCode(562, decode_header_block, bad)

    def test_header_block_bounds_refused_when_sealing(self):
        """A block the other side could not open (too many pairs, too long) is refused when it is made, at the limits
        exactly as the opening side sets them."""
        self.assertEqual(len(decode_header_block(encode_header_block([(b"a", b"b")] * MAX_HEADER_PAIRS))), 256)
        self.assertRaises(ValueError, encode_header_block, [(b"a", b"b")] * (MAX_HEADER_PAIRS + 1))
        overhead = len(encode_header_block([(b"a", b"")]))
        longest = [(b"a", b"v" * (MAX_HEADER_BLOCK - overhead))]
        self.assertEqual(len(encode_header_block(longest)), MAX_HEADER_BLOCK)
        self.assertEqual(decode_header_block(encode_header_block(longest)), longest)
        self.assertCode(562, decode_header_block, encode_header_block(longest)[:-2] + b'v"]]')
        self.assertRaises(ValueError, encode_header_block, [(b"a", b"v" * (MAX_HEADER_BLOCK - overhead + 1))])

    def test_header_block_over_a_bound_says_which(self):
        """A block over a bound is refused (562) with the bound named, not as a malformed list: a client author
        seeing the error knows what to change."""
        too_many = b"[" + b",".join([b'["a","b"]'] * (MAX_HEADER_PAIRS + 1)) + b"]"
        self.assertIn(f"more than {MAX_HEADER_PAIRS} pairs", self.assertCode(562, decode_header_block, too_many).detail)
        too_long = b'[["a","' + b"v" * MAX_HEADER_BLOCK + b'"]]'
        self.assertIn(f"over {MAX_HEADER_BLOCK} bytes", self.assertCode(562, decode_header_block, too_long).detail)


class Base64Tests(CodeAssertions, SynchronousTestCase):
    """Strict unpadded base64url."""

    @fast
    @given(st.binary(max_size=50))
    def test_round_trip(self, data):
        """Encoding then decoding gives the bytes back and uses no padding."""
        text = b64encode(data)
        self.assertNotIn("=", text)
        self.assertEqual(b64decode(text), data)

    def test_non_canonical_rejected(self):
        """Padding, foreign characters, impossible lengths and non-zero trailing bits raise the given code."""
        for bad in ("QQ==", "Q+8", "Q/8", "Q", "QR", "Q Q", "é"):
            self.assertCode(562, b64decode, bad)
        self.assertCode(565, b64decode, "QR", code=565)
        self.assertEqual(b64decode("QQ"), b"A")


PAIRS = {"MKE": pair("MKE"), "MTE": pair("MTE")}


class OutputLengthTests(SynchronousTestCase):
    def test_output_length_matches_stream(self):
        """A body transform's output_length predicts exactly what it produces, so Content-Length can be kept."""
        keys = message(*pair())[2]
        for n in (0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL):
            encoder = keys.body_encoder(record_size=SMALL)
            encoded = b"".join(encoder.feed(b"x" * n) + encoder.finish())
            self.assertEqual(encoder.output_length(n), len(encoded))
            self.assertEqual(keys.body_decoder(record_size=SMALL).output_length(len(encoded)), n)
