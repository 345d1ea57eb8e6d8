"""
The relay's settings: one frozen ``Settings`` built once from, highest first, command-line options, environment
variables, a YAML file (``--config``) and defaults.

Every setting has a flag, an environment name and a YAML key (named as in the product documents). A missing or invalid
value raises ``ConfigError`` whose message is one line naming the setting, where the value came from and what is wrong;
it never repeats a secret value.
"""

import base64
import binascii
import json
import os
from urllib.parse import urlsplit, urlunsplit

import attrs
import yaml

from mterelay.codec import is_field_value, is_token
from mterelay.redis_registry import RedisAddress
from mterelay.registry import DEFAULT_MAX_PAIRS_PER_CLIENT, DEFAULT_MAX_PAIRS_TOTAL, DEFAULT_PAIR_TTL
from mterelay.upstream import HOP_BY_HOP

FLAG = "flag"
ENVIRONMENT = "environment"
FILE = "file"

DEFAULT_PORT = 8080
#: Pending connections the kernel queues per listening port: Twisted's default (50) drops the SYNs of a burst of
#: new clients, which then wait a full second to retry.
LISTEN_BACKLOG = 1024


def port_endpoint(port):
    """The endpoint string that ``--port``/PORT stands for."""
    return f"tcp:{port}:backlog={LISTEN_BACKLOG}"
DEFAULT_CORS_METHODS = ("GET", "POST", "PUT", "DELETE")
#: Below this length a CLIENT_ID_SECRET is accepted with a warning (the product documents recommend 32+ characters).
MIN_SECRET_LENGTH = 32


class ConfigError(Exception):
    """An invalid or missing setting; ``str()`` is the one-line message for the operator."""


@attrs.frozen
class Settings:
    """
    Every setting the relay reads, validated and normalized.

    Origins (``upstream``, ``allowed_peers``, ``cors_origins``, ``peer_pins`` keys) are ``scheme://host[:port]`` with a
    lower-case scheme and host, no default port and no trailing slash. Secrets are left out of ``repr``.
    """

    upstream: str
    #: The first secret signs client ids, all of them verify (rotation).
    client_id_secrets: tuple = attrs.field(repr=False, converter=tuple)
    outbound_token: str | None = attrs.field(default=None, repr=False)
    allowed_peers: tuple = attrs.field(default=(), converter=tuple)
    #: May hold a Redis password, hence hidden.
    redis_url: str | None = attrs.field(default=None, repr=False)
    #: Twisted server endpoint strings, one listening service each.
    listen: tuple = attrs.field(default=(port_endpoint(DEFAULT_PORT),), converter=tuple)
    debug: bool = False
    #: ``(name, value)`` pairs added to every response and every upstream request. Clients see them, but an outbound
    #: relay's may be meant for the peer's upstream alone (it seals them), hence hidden.
    headers: tuple = attrs.field(default=(), converter=tuple, repr=False)
    pass_through_routes: tuple = attrs.field(default=(), converter=tuple)
    #: None means "every route that is not a pass-through route is an MTE route".
    mte_routes: tuple | None = None
    cors_origins: tuple = attrs.field(default=(), converter=tuple)
    cors_methods: tuple = attrs.field(default=DEFAULT_CORS_METHODS, converter=tuple)
    max_pool_size: int = 25
    upstream_timeout: float = 30.0
    max_body_size: int = 1 << 30
    log_format: str = "text"
    #: Path to the relay's Ed25519 identity key (PEM); None means an ephemeral key.
    identity_key: str | None = None
    pair_ttl: int = DEFAULT_PAIR_TTL
    max_pairs_per_client: int = DEFAULT_MAX_PAIRS_PER_CLIENT
    max_pairs: int = DEFAULT_MAX_PAIRS_TOTAL
    redis_timeout: float = 2.0
    #: ``(origin, base64url Ed25519 public key)`` pairs the outbound role pins peer relays to.
    peer_pins: tuple = attrs.field(default=(), converter=tuple)
    drain_timeout: float = 10.0

    def peer_pin(self, origin):
        """The pinned public key (base64url) of the peer relay at ``origin``, or None."""
        return dict(self.peer_pins).get(origin)


# -- value parsers: each takes a raw value (a string from a flag or the environment, or a native YAML value) and
# -- returns the normalized value or raises ValueError with a short public reason.


def _text(value):
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise ValueError("empty value")
    return text


def _list(value):
    """A comma-separated string or a YAML list of strings."""
    items = value if isinstance(value, list) else _text(value).split(",")
    items = [_text(item) for item in items if str(item).strip()]
    if not items:
        raise ValueError("empty list")
    return tuple(items)


def _mapping(value):
    """A JSON object string or a YAML mapping, with string keys and scalar values."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"not a JSON object: {e.msg} at column {e.colno}") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return {_text(k): _text(v) for k, v in value.items()}


def _origin_of(parts):
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))


def _shown(parts):
    """A URL as an error may quote it: scheme, host and port only (user, password, path and query can hold tokens)."""
    return repr(_origin_of(parts))


def loggable_url(url):
    """``url`` as a log may show it: scheme, host and port, then ``/...`` for a path (it can hold a token)."""
    parts = urlsplit(url)
    return _origin_of(parts) + ("/..." if parts.path.strip("/") else "")


def _url(value, allow_path):
    text = _text(value)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("not an http(s) URL (it does not parse)") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {_shown(parts)}" if parts.hostname else "not an http(s) URL: no host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"user, query and fragment are not allowed: {_shown(parts)}")
    path = parts.path.rstrip("/")
    if path and not allow_path:
        raise ValueError(f"an origin has no path: {_shown(parts)}")
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    default_port = {"http": 80, "https": 443}[scheme]
    netloc = host if port in (None, default_port) else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


def normalize_origin(value):
    """``scheme://host[:port]`` for an http(s) origin; ValueError when ``value`` is not one."""
    return _url(value, allow_path=False)


def _upstream(value):
    return _url(value, allow_path=True)


def _origins(value):
    return tuple(normalize_origin(item) for item in _list(value))


def _routes(value):
    routes = _list(value)
    for route in routes:
        if not route.startswith("/"):
            raise ValueError(f"a route starts with '/': {route!r}")
    return routes


def _number(value, convert, kind):
    if isinstance(value, bool):
        raise ValueError(f"expected {kind}")
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ValueError(f"not {kind}: {value!r}") from None


def _whole(value):
    # int() would truncate a YAML float (port: 8080.9 listening on 8080); the same text from the environment is refused.
    if isinstance(value, float):
        raise ValueError
    return int(value)


def _int(low, high=None):
    def parse(value):
        number = _number(value, _whole, "an integer")
        if number < low:
            raise ValueError(f"must be at least {low}")
        if high is not None and number > high:
            raise ValueError(f"must be at most {high}")
        return number

    return parse


def _seconds(value):
    number = _number(value, float, "a number of seconds")
    if not 0 < number < float("inf"):
        raise ValueError("must be a positive number of seconds")
    return number


def _bool(value):
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _secrets(value):
    # Never echo the value: these are secrets.
    try:
        return _list(value)
    except ValueError:
        raise ValueError("empty secret") from None


def _secret(value):
    try:
        return _text(value)
    except ValueError:
        raise ValueError("empty secret") from None




#: Headers HEADERS may not add: each message has its own (framing, hop-by-hop, the relay's content-type of sealed
#: bodies, the protocol's), and a second copy would contradict it. (Host may be set: it names the upstream's virtual
#: host.)
_NOT_ADDED = frozenset((b"content-length", b"content-type", *HOP_BY_HOP))


def _headers(value):
    headers = _mapping(value)
    for name, text in headers.items():
        if not is_token(name):
            raise ValueError(f"not a header name: {name!r}")
        lower = name.lower().encode("ascii")
        if lower in _NOT_ADDED or lower.startswith((b"x-mte-", b"proxy-")):
            raise ValueError(f"{name} is set by the relay for each message, not by HEADERS")
        # Latin-1 is what a header's bytes are read as; a control character would split or corrupt the head.
        if not all(ord(c) < 256 for c in text) or not is_field_value(text):
            raise ValueError(f"the value of {name} holds a character a header cannot carry")
    return tuple(headers.items())


def _redis_url(value):
    text = _text(value)
    # The registry's own parser, so that every form it connects to is accepted; its errors never quote the URL,
    # which may carry a password.
    RedisAddress.from_url(text)
    return text


def _log_format(value):
    text = _text(value).lower()
    if text not in ("text", "json"):
        raise ValueError(f"must be text or json, not {value!r}")
    return text


def _readable_file(value):
    path = _text(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError(f"not a readable file: {path!r}")
    return path


def _peer_pins(value):
    pins = []
    for origin, key in _mapping(value).items():
        origin = normalize_origin(origin)  # first: its errors never quote credentials
        try:
            raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError(f"the pin of {origin!r} is not a base64url Ed25519 public key")
        pins.append((origin, key.rstrip("=")))
    return tuple(pins)


def _methods(value):
    methods = tuple(m.upper() for m in _list(value))
    for method in methods:
        if not is_token(method):
            raise ValueError(f"not an HTTP method: {method!r}")
    return methods


@attrs.frozen
class Option:
    """How one setting is named in each source, parsed, and documented."""

    field: str
    flag: str
    env: str
    key: str
    parse: object
    help: str
    #: Shown in ``--help``; None for required settings.
    default: str | None = None

    def describe(self, source, path=None):
        """The setting's name as the operator wrote it in ``source``."""
        if source == FLAG:
            return f"--{self.flag} (flag)"
        if source == ENVIRONMENT:
            return f"{self.env} (environment)"
        return f"{self.key} (file {path})"


OPTIONS = (
    Option("upstream", "upstream", "UPSTREAM", "upstream", _upstream, "URL that requests are proxied to (required)"),
    Option(
        "client_id_secrets",
        "client-id-secret",
        "CLIENT_ID_SECRET",
        "clientIdSecret",
        _secrets,
        "secret signing x-mte-client-id, 32+ characters; a comma list rotates: first signs, all verify (required)",
    ),
    Option("outbound_token", "outbound-token", "OUTBOUND_TOKEN", "outboundToken", _secret,
           "token that enables the outbound role", "unset: outbound role off"),
    Option("allowed_peers", "allowed-peers", "ALLOWED_PEERS", "allowedPeers", _origins,
           "comma list of relay origins the outbound role may reach", "none"),
    Option("redis_url", "redis-url", "REDIS_URL", "redisURL", _redis_url, "Redis URL for the pair registry",
           "unset: in-memory registry"),
    Option("port", "port", "PORT", "port", _int(1, 65535),
           "port to listen on, shorthand for --listen tcp:PORT:backlog=1024", str(DEFAULT_PORT)),
    Option("listen", "listen", "LISTEN", "listen", _list,
           "Twisted server endpoint, repeatable (comma list in the environment), e.g. ssl:443:privateKey=key.pem",
           port_endpoint(DEFAULT_PORT)),
    Option("debug", "debug", "DEBUG", "debug", _bool, "debug logging and x-request-id headers", "false"),
    Option("headers", "headers", "HEADERS", "headers", _headers,
           "JSON object of headers added to every response and upstream request", "none"),
    Option("pass_through_routes", "pass-through-routes", "PASS_THROUGH_ROUTES", "passThroughRoutes", _routes,
           "comma list of routes proxied without encoding, * wildcards", "none"),
    Option("mte_routes", "mte-routes", "MTE_ROUTES", "mteRoutes", _routes,
           "comma list of MTE routes, * wildcards; when set other paths answer 404", "unset: every other route"),
    Option("cors_origins", "cors-origins", "CORS_ORIGINS", "corsOrigins", _origins,
           "comma list of origins allowed cross-origin requests", "none"),
    Option("cors_methods", "cors-methods", "CORS_METHODS", "corsMethods", _methods,
           "comma list of CORS methods (OPTIONS and HEAD always allowed)", ",".join(DEFAULT_CORS_METHODS)),
    Option("max_pool_size", "max-pool-size", "MAX_POOL_SIZE", "maxPoolSize", _int(1),
           "MTE pairs the outbound role keeps per peer relay", "25"),
    Option("upstream_timeout", "upstream-timeout", "UPSTREAM_TIMEOUT", "upstreamTimeout", _seconds,
           "seconds to wait for the upstream's response headers", "30"),
    Option("max_body_size", "max-body-size", "MAX_BODY_SIZE", "maxBodySize", _int(0),
           "largest request body in bytes", str(1 << 30)),
    Option("log_format", "log-format", "LOG_FORMAT", "logFormat", _log_format, "text or json", "text"),
    Option("identity_key", "identity-key", "IDENTITY_KEY", "identityKey", _readable_file,
           "path to the relay's Ed25519 identity key (PEM)", "unset: ephemeral key, with a warning"),
    Option("pair_ttl", "pair-ttl", "PAIR_TTL", "pairTTL", _int(1), "seconds an idle pair is kept", "1800"),
    Option("max_pairs_per_client", "max-pairs-per-client", "MAX_PAIRS_PER_CLIENT", "maxPairsPerClient", _int(1),
           "pairs one client id may hold", "100"),
    Option("max_pairs", "max-pairs", "MAX_PAIRS", "maxPairs", _int(1), "pairs the relay holds in all", "100000"),
    Option("redis_timeout", "redis-timeout", "REDIS_TIMEOUT", "redisTimeout", _seconds,
           "seconds to wait for Redis", "2"),
    Option("peer_pins", "peer-pins", "PEER_PINS", "peerPins", _peer_pins,
           "JSON object: peer relay origin -> base64url Ed25519 public key", "none"),
    Option("drain_timeout", "drain-timeout", "DRAIN_TIMEOUT", "drainTimeout", _seconds,
           "seconds in-flight requests may take to finish on stop", "10"),
)

_BY_FIELD = {option.field: option for option in OPTIONS}
_BY_KEY = {option.key: option for option in OPTIONS}


def _read_file(path):
    where = f"--config (flag): cannot read {path!r}"
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{where}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}: invalid YAML{line}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config (flag): {path!r} does not hold a mapping of settings")
    for key in data:
        if key not in _BY_KEY:
            raise ConfigError(f"{key} (file {path}): unknown setting")
    return {_BY_KEY[key].field: value for key, value in data.items()}


#: The commercial product's settings that mterelay names differently or does without (README, "Coming from...").
_PRODUCT_NAMES = {
    "PASSTHROUGH_ROUTES": "it is spelled PASS_THROUGH_ROUTES",
    "SERVER_ID": "CLIENT_ID_SECRET and IDENTITY_KEY identify a relay",
    "AWS_REGION": "the relay uses no AWS service",
}


def load(flags, environ, config_path=None, checks=None):
    """
    Build ``Settings`` from ``flags`` (field name -> raw value given on the command line; ``listen`` a list),
    ``environ`` (a mapping like ``os.environ``) and the YAML file at ``config_path``. ``checks`` maps a field name to
    a function of its parsed value that raises ValueError as a parser does, for what only the caller can check (an
    endpoint against its reactor, the key in a file), so that its errors name the value's source too.

    Returns ``(settings, warnings)``, warnings being one-line strings for the log. Raises ``ConfigError``.
    """
    checks = checks or {}
    file_values = _read_file(config_path) if config_path else {}
    values = {}
    given = set()
    for option in OPTIONS:
        candidates = (
            (FLAG, flags.get(option.field)),
            (ENVIRONMENT, environ.get(option.env) or None),
            (FILE, file_values.get(option.field)),
        )
        for source, raw in candidates:
            if raw is None or raw == []:
                continue
            if source == FLAG and option.field == "listen":
                raw = ",".join(raw)
            try:
                values[option.field] = option.parse(raw)
                if option.field in checks:
                    checks[option.field](values[option.field])
            except ValueError as e:
                raise ConfigError(f"{option.describe(source, config_path)}: {e}") from None
            given.add(option.field)
            break
    for field in ("upstream", "client_id_secrets"):
        if field not in values:
            option = _BY_FIELD[field]
            raise ConfigError(
                f"{option.env}: required; set --{option.flag}, {option.env} or {option.key} in the --config file"
            )
    port = values.pop("port", DEFAULT_PORT)
    listen = values.pop("listen", ())
    if "port" in given or not listen:
        listen = listen + (port_endpoint(port),)
    warnings = []
    if any(len(secret) < MIN_SECRET_LENGTH for secret in values["client_id_secrets"]):
        warnings.append(f"CLIENT_ID_SECRET: a secret shorter than {MIN_SECRET_LENGTH} characters is easy to guess")
    if "identity_key" not in values:
        warnings.append("IDENTITY_KEY: unset, using an ephemeral identity key; peers cannot pin this relay")
    if values.get("outbound_token") and not values.get("allowed_peers"):
        warnings.append("OUTBOUND_TOKEN: set without ALLOWED_PEERS, so every outbound request is refused (403)")
    for origin, _ in values.get("peer_pins", ()):
        # A pin is looked up by the peer's origin exactly as ALLOWED_PEERS spells it: this one pins nothing.
        if origin not in values.get("allowed_peers", ()):
            warnings.append(f"PEER_PINS: {origin} is not one of ALLOWED_PEERS, so no peer is pinned by it")
    for name, instead in _PRODUCT_NAMES.items():
        if environ.get(name) is not None:
            warnings.append(f"{name}: not read by mterelay; {instead}")
    return Settings(listen=listen, **values), warnings
