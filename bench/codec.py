"""
Codec benchmark (a plain script, not a test): ``.venv/bin/python bench/codec.py``.

For 1 KiB and 1 MiB bodies, prints encode and decode MB/s and microseconds per message for MKE and MTE beside raw
AES-256-GCM (one cached AESGCM object, one call over the whole item) from the same run, as ratios (raw and codec
runs alternate, best of 7 rounds each); then pairings per second. A message's cost includes its per-message key
derivation on each side (``keys_for`` / ``advance``).

"1 MiB one feed" hands the whole body (the plaintext to encode, the encoded body to decode) to ``feed`` at once,
as does the 1 KiB case; "1 MiB streamed" feeds it in 64 KiB chunks, as the relay does with network reads (a 128 KiB
record then spans two or three chunks, so it is joined once before its AEAD call).
The codec's output is its list of records, all alive together; the line "raw, one call per record" is raw AES-GCM
doing the same (one call per 128 KiB record, outputs kept), the ceiling for this record size, and "raw, fresh
output" shows what the allocator alone charges raw AES-GCM for a fresh 1 MiB buffer on this machine.

glibc's dynamic mmap/trim thresholds make large buffers cost page faults until a large block has been freed once, so
figures depend on which case runs first; unless ``--default-malloc`` is given, the script pins the thresholds (via
``mallopt``) so that every case, raw AES-GCM included, runs on a warm heap.
"""

import ctypes
import ctypes.util
import os
import sys
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mterelay.codec import RECORD_SIZE, ClientPairing, RelayIdentity, relay_pair

CLIENT = "bench-client-0123456789"
PAIR = "bench-pair-0123456789"
#: Bytes per network read (Twisted reads up to 64 KiB at a time).
READ = 65536
#: label -> (body size, feed chunk size; None: the whole input, plaintext or encoded, in one feed)
CASES = {"1 KiB": (1024, None), "1 MiB one feed": (1 << 20, None), "1 MiB streamed": (1 << 20, READ)}


def best(function, count, repeat=5):
    """Best seconds per call of ``function()`` over ``repeat`` runs of ``count`` calls."""
    return interleaved([function], count, repeat)[0]


def interleaved(functions, count, repeat=7):
    """
    Best seconds per call of each function, over ``repeat`` rounds in which every function runs ``count`` calls in
    turn: a baseline and what is compared with it see the same moments of a shared, noisy machine. Each round starts
    one function later, so that no function always runs first (or always right after the same one).
    """
    times = [[] for _ in functions]
    for round_ in range(repeat):
        for i in range(len(functions)):
            j = (round_ + i) % len(functions)
            start = time.perf_counter()
            for _ in range(count):
                functions[j]()
            times[j].append((time.perf_counter() - start) / count)
    return [min(log) for log in times]


def pair(encode_type, identity):
    """A (client state, relay state) pair made by a real pairing."""
    pairing = ClientPairing.start(CLIENT, PAIR, encode_type)
    relay, reply = relay_pair(identity, CLIENT, PAIR, encode_type, pairing.public_key)
    return pairing.finish(reply.ciphertext, reply.signature, identity.public_bytes()), relay


def raw_case(data):
    """Raw AES-256-GCM over the whole item: encrypt, decrypt, and encrypt while the previous output is alive."""
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    sealed = aead.encrypt(nonce, data, b"")
    return (
        lambda: aead.encrypt(nonce, data, b""),
        lambda: aead.decrypt(nonce, sealed, b""),
        lambda: (aead.encrypt(nonce, data, b""), aead.encrypt(nonce, data, b"")),
    )


def raw_records(data):
    """Raw AES-256-GCM with one call per record: the ceiling for any codec using this record size."""
    aead = AESGCM(os.urandom(32))
    nonce = os.urandom(12)
    view = memoryview(data)
    return lambda: [aead.encrypt(nonce, view[i : i + RECORD_SIZE], b"") for i in range(0, len(data), RECORD_SIZE)]


def stream(transform, data, chunk):
    """Feed ``data`` in ``chunk``-sized pieces (all of it at once if None); the transform's output, its records."""
    view = memoryview(data)
    chunk = chunk or len(data)
    out = []
    for i in range(0, len(data), chunk):
        out += transform.feed(view[i : i + chunk])
    return out + transform.finish()


def codec_case(encode_type, data, chunk, identity):
    """Encode (client: keys + body records) and decode (relay: keys + body records), one message per call."""
    client, relay = pair(encode_type, identity)
    box = {"client": client, "counter": 0}

    def client_keys():
        if encode_type == "MKE":
            box["counter"] += 1
            return client.keys_for(box["counter"])
        box["client"], request, response = box["client"].advance()
        return box["client"], request, response

    def encode():
        return stream(client_keys()[1].body_encoder(), data, chunk)

    sealed = b"".join(stream(client_keys()[1].body_encoder(), data, None))
    counter = box["counter"] if encode_type == "MKE" else 0

    def decode():
        # The relay re-derives the same message's keys each time so that an MTE decode can be repeated.
        return stream(relay.keys_for(counter)[1].body_decoder(), sealed, chunk)

    assert b"".join(decode()) == data
    return encode, decode


def records_case(data, chunk, identity):
    """
    The body records alone: encode and decode with one message's keys set up once (``keys_for`` run and the AEAD
    keyed before timing) and reused for every call, which only a benchmark may do (it repeats nonces). The codec's
    rows minus these are what setting up a message costs.
    """
    client, relay = pair("MKE", identity)
    request = client.keys_for(1)[1]
    sealed = b"".join(stream(request.body_encoder(), data, None))
    opener = relay.keys_for(1)[1]
    assert b"".join(stream(opener.body_decoder(), sealed, None)) == data
    return (
        lambda: stream(request.body_encoder(), data, chunk),
        lambda: stream(opener.body_decoder(), sealed, chunk),
    )


def pin_malloc_thresholds():
    """Fix glibc's mmap and trim thresholds (M_MMAP_THRESHOLD -3, M_TRIM_THRESHOLD -1) at 64 MiB; False if unavailable."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    return all(libc.mallopt(option, 64 << 20) == 1 for option in (-3, -1))


def main():
    if "--default-malloc" not in sys.argv:
        print("glibc thresholds pinned:", pin_malloc_thresholds())
    identity = RelayIdentity.generate()
    print(f"{'case':<26}{'enc MB/s':>10}{'dec MB/s':>10}{'enc+dec us':>12}{'enc/raw':>9}{'dec/raw':>9}")
    for label, (size, chunk) in CASES.items():
        data = os.urandom(size)
        count = 20000 if size < 65536 else 40
        raw_encode, raw_decode, raw_fresh = raw_case(data)
        functions = [raw_encode, raw_decode]
        for encode_type in ("MKE", "MTE"):
            functions += codec_case(encode_type, data, chunk, identity)
        functions += records_case(data, chunk, identity)
        # The two reference lines (fresh output, one call per record) run in the same rounds as everything else.
        functions += [raw_fresh, raw_records(data)]
        results = interleaved(functions, count)
        names = ("raw AES-GCM", "MKE", "MTE", "records only")
        rows = {name: results[2 * i : 2 * i + 2] for i, name in enumerate(names)}
        raw = rows["raw AES-GCM"]
        fresh, per_record = results[8] / 2, results[9]
        for name, (enc, dec) in rows.items():
            print(
                f"{name + ' ' + label:<26}{size / enc / 1e6:>10.0f}{size / dec / 1e6:>10.0f}"
                f"{(enc + dec) * 1e6:>12.1f}{raw[0] / enc:>9.2f}{raw[1] / dec:>9.2f}"
            )
        if size > RECORD_SIZE and chunk is None:
            print(f"{'raw, fresh output ' + label:<26}{size / fresh / 1e6:>10.0f}{'':>10}{'':>12}{raw[0] / fresh:>9.2f}")
        if size > RECORD_SIZE:
            print(f"{'raw, one call per record':<26}{size / per_record / 1e6:>10.0f}{'':>10}{'':>12}"
                  f"{raw[0] / per_record:>9.2f}")
    count = 300
    client_start = best(lambda: ClientPairing.start(CLIENT, PAIR, "MKE"), count, 3)
    probe = ClientPairing.start(CLIENT, PAIR, "MKE")
    relay_side = best(lambda: relay_pair(identity, CLIENT, PAIR, "MKE", probe.public_key), count, 3)
    _, reply = relay_pair(identity, CLIENT, PAIR, "MKE", probe.public_key)
    finish = best(lambda: probe.finish(reply.ciphertext, reply.signature, identity.public_bytes()), count, 3)
    print(
        f"pairings/s on one core: client (start+finish) {1 / (client_start + finish):.0f}, "
        f"relay {1 / relay_side:.0f}, both sides {1 / (client_start + finish + relay_side):.0f}"
    )


if __name__ == "__main__":
    main()
