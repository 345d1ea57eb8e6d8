"""
``python -m mterelay.keygen PATH``: create a relay identity key (Ed25519, PKCS#8 PEM, file mode 0600) for
IDENTITY_KEY, and print its public key, the value peers put in PEER_PINS and clients pass as ``--pin``.

Every relay instance behind one load balancer must load the same key file.
"""

import argparse
import os
import sys

from mterelay.codec import RelayIdentity


def write_identity(path):
    """Create ``path`` (refusing to overwrite) holding a fresh identity; return the identity."""
    identity = RelayIdentity.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(identity.to_pem())
    return identity


def main(argv=None, out=sys.stdout):
    # The whole first paragraph: its first line alone stops mid-sentence.
    summary = __doc__.strip().split("\n\n")[0].replace("\n", " ")
    parser = argparse.ArgumentParser(prog="python -m mterelay.keygen", description=summary)
    parser.add_argument("path", help="where to write the private key (must not exist)")
    args = parser.parse_args(argv)
    try:
        identity = write_identity(args.path)
    except OSError as e:
        parser.exit(1, f"mterelay.keygen: error: {args.path}: {e.strerror}\n")
    out.write(f"{identity.public_b64()}\n")


if __name__ == "__main__":
    main()
