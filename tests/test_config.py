"""Tests for mterelay.config: precedence, parsing, normalization and the one-line errors."""

import base64
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from mterelay.clientid import ClientIdSigner
from mterelay.config import ConfigError, Settings, load, normalize_origin, port_endpoint

SECRET = "s" * 40
BASE_ENV = {"UPSTREAM": "http://up.example", "CLIENT_ID_SECRET": SECRET}


class ConfigTestCase(SynchronousTestCase):
    def write_yaml(self, text):
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def error(self, flags=None, environ=None, path=None):
        """The ConfigError message that loading these sources raises."""
        return str(self.assertRaises(ConfigError, load, flags or {}, environ or {}, path))


class PrecedenceTests(ConfigTestCase):
    def test_flag_beats_environment_beats_file(self):
        """A flag overrides the environment, which overrides the YAML file, which overrides the default."""
        path = self.write_yaml("upstream: http://file.example\nport: 3000\nmaxPoolSize: 7\nupstreamTimeout: 5\n")
        environ = dict(BASE_ENV, UPSTREAM="http://env.example", PORT="4000")
        settings, _ = load({"upstream": "http://flag.example"}, environ, path)
        self.assertEqual(settings.upstream, "http://flag.example")
        self.assertEqual(settings.listen, (port_endpoint(4000),))
        self.assertEqual(settings.max_pool_size, 7)
        self.assertEqual(settings.upstream_timeout, 5.0)
        self.assertEqual(settings.max_pairs, 100_000)

    def test_defaults(self):
        """Unset settings take the documented defaults."""
        settings, _ = load({}, BASE_ENV)
        self.assertEqual(settings.listen, (port_endpoint(8080),))
        self.assertEqual(settings.cors_methods, ("GET", "POST", "PUT", "DELETE"))
        self.assertEqual((settings.max_pool_size, settings.pair_ttl, settings.drain_timeout), (25, 1800, 10.0))
        self.assertIsNone(settings.mte_routes)
        self.assertIsNone(settings.outbound_token)
        self.assertFalse(settings.debug)

    def test_product_full_yaml_example(self):
        """The product documents' full YAML example loads, lists as YAML lists and headers as a mapping."""
        path = self.write_yaml(
            "upstream: https://api.my-company.com\n"
            f"clientIdSecret: {SECRET}\n"
            "corsOrigins:\n- https://www.my-company.com\n- https://dashboard.my-company.com/\n"
            "redisURL: redis://10.0.1.230:6379\nport: 3000\ndebug: true\n"
            "passThroughRoutes:\n- /health\n- /version\nmteRoutes:\n- /api/v1/*\n- /api/v2/*\n"
            "corsMethods:\n- GET\n- POST\n- DELETE\nheaders:\n  x-service-name: mte-relay\nmaxPoolSize: 10\n"
        )
        settings, _ = load({}, {}, path)
        self.assertEqual(settings.cors_origins, ("https://www.my-company.com", "https://dashboard.my-company.com"))
        self.assertEqual(settings.pass_through_routes, ("/health", "/version"))
        self.assertEqual(settings.mte_routes, ("/api/v1/*", "/api/v2/*"))
        self.assertEqual(settings.headers, (("x-service-name", "mte-relay"),))
        self.assertEqual(settings.listen, (port_endpoint(3000),))
        self.assertTrue(settings.debug)

    def test_product_full_env_example(self):
        """The product documents' full environment example loads: comma lists and a JSON HEADERS object."""
        environ = dict(
            BASE_ENV,
            CORS_ORIGINS="https://www.my-company.com,https://dashboard.my-company.com",
            PASS_THROUGH_ROUTES="/health,/version",
            MTE_ROUTES="/api/v1/*,/api/v2/*",
            CORS_METHODS="get, post,DELETE",
            HEADERS='{"x-service-name":"mte-relay"}',
            DEBUG="true",
            MAX_POOL_SIZE="10",
        )
        settings, _ = load({}, environ)
        self.assertEqual(settings.cors_methods, ("GET", "POST", "DELETE"))
        self.assertEqual(settings.headers, (("x-service-name", "mte-relay"),))
        self.assertEqual(settings.max_pool_size, 10)

    def test_listen_and_port(self):
        """--listen endpoints replace the default port; an explicit PORT is added to them."""
        settings, _ = load({"listen": ["tcp:1:interface=127.0.0.1", "unix:/tmp/s"]}, BASE_ENV)
        self.assertEqual(settings.listen, ("tcp:1:interface=127.0.0.1", "unix:/tmp/s"))
        settings, _ = load({"listen": ["unix:/tmp/s"]}, dict(BASE_ENV, PORT="81"))
        self.assertEqual(settings.listen, ("unix:/tmp/s", port_endpoint(81)))

    def test_origins_normalized(self):
        """Origins lose the default port, the trailing slash and upper case; the upstream keeps a path prefix."""
        self.assertEqual(normalize_origin("HTTPS://Relay.Example:443/"), "https://relay.example")
        self.assertEqual(normalize_origin("http://relay.example:8080"), "http://relay.example:8080")
        settings, _ = load({"upstream": "http://Up.Example:80/base/"}, BASE_ENV)
        self.assertEqual(settings.upstream, "http://up.example/base")

    def test_secret_rotation_list(self):
        """A comma-separated CLIENT_ID_SECRET gives several secrets; the first one signs."""
        settings, _ = load({}, dict(BASE_ENV, CLIENT_ID_SECRET=f"{SECRET}, {'t' * 40}"))
        self.assertEqual(settings.client_id_secrets, (SECRET, "t" * 40))
        token = ClientIdSigner(settings.client_id_secrets).issue().token
        self.assertFalse(ClientIdSigner((SECRET,)).verify(token).resigned)

    def test_peer_pins(self):
        """PEER_PINS maps normalized origins to base64url Ed25519 public keys."""
        key = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        settings, _ = load({}, dict(BASE_ENV, PEER_PINS=f'{{"https://Peer.Example/": "{key}"}}'))
        self.assertEqual(settings.peer_pin("https://peer.example"), key)
        self.assertIsNone(settings.peer_pin("https://other.example"))


class ErrorTests(ConfigTestCase):
    def test_missing_upstream(self):
        """No upstream anywhere names UPSTREAM and the three ways to set it."""
        self.assertEqual(
            self.error(environ={"CLIENT_ID_SECRET": SECRET}),
            "UPSTREAM: required; set --upstream, UPSTREAM or upstream in the --config file",
        )

    def test_bad_url_from_each_source(self):
        """A bad URL is reported with the name used by its source: flag, environment or file."""
        self.assertEqual(
            self.error(environ=dict(BASE_ENV, UPSTREAM="ftp://x")),
            "UPSTREAM (environment): not an http(s) URL: 'ftp://x'",
        )
        self.assertEqual(
            self.error({"upstream": "no-scheme"}, BASE_ENV), "--upstream (flag): not an http(s) URL: no host"
        )
        path = self.write_yaml("allowedPeers:\n- https://peer/path\n")
        self.assertEqual(
            self.error(environ=BASE_ENV, path=path),
            f"allowedPeers (file {path}): an origin has no path: 'https://peer'",
        )

    def test_url_errors_quote_no_credentials(self):
        """A refused URL is quoted without its user, password, query or fragment: they may hold credentials."""
        for name, value in (
            ("UPSTREAM", "https://svc:hunter2@api.internal?key=k3y#fr4gment"),
            ("ALLOWED_PEERS", "https://relay:tok3n@peer:99999"),
            ("UPSTREAM", "gopher://svc:hunter2@api.internal/x?key=k3y"),
            ("ALLOWED_PEERS", "https://peer.internal/hooks/T0KEN-s3cret"),
            ("PEER_PINS", '{"https://svc:hunter2@peer.internal": "AAAA"}'),
            ("PEER_PINS", '{"https://peer.internal/T0KEN-s3cret": "AAAA"}'),
        ):
            message = self.error(environ=dict(BASE_ENV, **{name: value}))
            self.assertTrue(message.startswith(f"{name} (environment): "), message)
            for secret in ("hunter2", "tok3n", "k3y", "svc", "relay:", "fr4gment", "s3cret"):
                self.assertNotIn(secret, message)
        self.assertEqual(
            self.error(environ=dict(BASE_ENV, UPSTREAM="https://svc:hunter2@api.internal/base?key=k3y")),
            "UPSTREAM (environment): user, query and fragment are not allowed: 'https://api.internal'",
        )

    def test_product_names_and_a_useless_token_warned(self):
        """The product's own setting names, and an outbound token with no peer allowed, are warned about at start."""
        env = dict(BASE_ENV, PASSTHROUGH_ROUTES="/x", SERVER_ID="s", AWS_REGION="eu-west-1", OUTBOUND_TOKEN="t" * 20)
        _, warnings = load({}, env)
        for name in (
            "PASSTHROUGH_ROUTES: not read by mterelay; it is spelled PASS_THROUGH_ROUTES",
            "SERVER_ID:",
            "AWS_REGION:",
            "OUTBOUND_TOKEN: set without ALLOWED_PEERS",
        ):
            self.assertTrue(any(w.startswith(name) for w in warnings), (name, warnings))
        _, warnings = load({}, dict(BASE_ENV, OUTBOUND_TOKEN="t" * 20, ALLOWED_PEERS="https://peer"))
        self.assertFalse([w for w in warnings if w.startswith(("OUTBOUND_TOKEN", "PASSTHROUGH", "SERVER_ID"))])

    def test_pin_for_no_allowed_peer_warned(self):
        """A PEER_PINS origin that is none of ALLOWED_PEERS (another spelling of the host, say) is warned about: it
        pins nothing, and the peer it was meant for goes unpinned."""
        key = "A" * 43
        env = dict(BASE_ENV, ALLOWED_PEERS="http://127.0.0.1:8443", PEER_PINS=f'{{"http://localhost:8443": "{key}"}}')
        _, warnings = load({}, env)
        expected = "PEER_PINS: http://localhost:8443 is not one of ALLOWED_PEERS, so no peer is pinned by it"
        self.assertIn(expected, warnings)
        env["PEER_PINS"] = f'{{"http://127.0.0.1:8443": "{key}"}}'
        _, warnings = load({}, env)
        self.assertFalse([w for w in warnings if w.startswith("PEER_PINS")])

    def test_caller_check_names_the_source(self):
        """A caller's check of a parsed value fails as a parser does: the one-line error names where it came from."""

        def check(listen):
            raise ValueError(f"cannot listen on {listen[-1]!r}")

        path = self.write_yaml("listen:\n- tcp:0\n- unix:/x\n")
        message = str(self.assertRaises(ConfigError, load, {}, BASE_ENV, path, {"listen": check}))
        self.assertEqual(message, f"listen (file {path}): cannot listen on 'unix:/x'")

    def test_unknown_yaml_key(self):
        """A YAML key that is not a setting is an error naming the key and the file."""
        path = self.write_yaml("upstream: http://x\nupstreem: http://y\n")
        self.assertEqual(self.error(environ=BASE_ENV, path=path), f"upstreem (file {path}): unknown setting")

    def test_headers_a_response_cannot_carry_refused(self):
        """HEADERS are checked at start, not met as a 500 on every request: a value beyond Latin-1 or with a control
        character, and a header each message sets itself (framing, hop-by-hop, content-type, x-mte-*), are each one
        line naming HEADERS and the header; the value is not quoted (HEADERS often hold an API key)."""
        for headers, named in (
            (r'{"X-Test":"ttt\u0436"}', "X-Test"),
            (r'{"X-Test":"a\u0001b"}', "X-Test"),
            (r'{"X-Test":"a\u007fb"}', "X-Test"),
            ('{"Content-Length":"0"}', "Content-Length"),
            ('{"connection":"keep-alive"}', "connection"),
            ('{"Content-Type":"text/plain"}', "Content-Type"),
            ('{"X-MTE-Relay":"1"}', "X-MTE-Relay"),
            ('{"Proxy-Authorization":"x"}', "Proxy-Authorization"),
        ):
            message = self.error(environ=dict(BASE_ENV, HEADERS=headers))
            self.assertTrue(message.startswith("HEADERS (environment): "), message)
            self.assertIn(named, message)
            self.assertNotIn("ttt", message)
        settings, _ = load({}, dict(BASE_ENV, HEADERS=r'{"X-Name":"caf\u00e9 \tok","Host":"api.internal"}'))
        self.assertEqual(settings.headers, (("X-Name", "caf\u00e9 \tok"), ("Host", "api.internal")))

    def test_bad_headers_json(self):
        """HEADERS that is not a JSON object says so."""
        message = self.error(environ=dict(BASE_ENV, HEADERS="{x-service-name: 1"))
        self.assertTrue(message.startswith("HEADERS (environment): not a JSON object"), message)
        message = self.error(environ=dict(BASE_ENV, HEADERS='["a"]'))
        self.assertEqual(message, "HEADERS (environment): not a JSON object")

    def test_bad_values(self):
        """Numbers, booleans, formats, routes, pins and Redis URLs are checked."""
        cases = {
            "PORT": ("0", "PORT (environment): must be at least 1"),
            "UPSTREAM_TIMEOUT": ("-1", "UPSTREAM_TIMEOUT (environment): must be a positive number of seconds"),
            "DEBUG": ("maybe", "DEBUG (environment): not a boolean: 'maybe'"),
            "LOG_FORMAT": ("xml", "LOG_FORMAT (environment): must be text or json, not 'xml'"),
            "MTE_ROUTES": ("api/*", "MTE_ROUTES (environment): a route starts with '/': 'api/*'"),
            "PEER_PINS": ('{"https://p": "abc"}', "PEER_PINS (environment): the pin of 'https://p' is not a base64url"
                          " Ed25519 public key"),
            "IDENTITY_KEY": ("/nonexistent/key.pem", "IDENTITY_KEY (environment): not a readable file: "
                             "'/nonexistent/key.pem'"),
        }
        for env, (value, expected) in cases.items():
            self.assertEqual(self.error(environ=dict(BASE_ENV, **{env: value})), expected)

    def test_port_out_of_range(self):
        """A port above 65535 is refused from every source (twistd would die on it with a traceback)."""
        self.assertEqual(self.error({"port": "70000"}, BASE_ENV), "--port (flag): must be at most 65535")
        self.assertEqual(self.error(environ=dict(BASE_ENV, PORT="70000")), "PORT (environment): must be at most 65535")
        path = self.write_yaml("port: 65536\n")
        self.assertEqual(self.error(environ=BASE_ENV, path=path), f"port (file {path}): must be at most 65535")
        settings, _ = load({}, dict(BASE_ENV, PORT="65535"))
        self.assertEqual(settings.listen, (port_endpoint(65535),))

    def test_integers_never_truncated(self):
        """A fractional number for an integer setting is refused from a YAML file as from the environment, never cut
        down (port: 8080.9 is not port 8080); an integral one such as 100.0 is refused the same way."""
        cases = (("port", "PORT", "8080.9"), ("pairTTL", "PAIR_TTL", "1.9"), ("maxPairs", "MAX_PAIRS", "100.0"))
        for key, env, value in cases:
            self.assertEqual(
                self.error(environ=dict(BASE_ENV, **{env: value})), f"{env} (environment): not an integer: '{value}'"
            )
            path = self.write_yaml(f"{key}: {value}\n")
            self.assertEqual(self.error(environ=BASE_ENV, path=path), f"{key} (file {path}): not an integer: {value}")
        path = self.write_yaml("port: 3000\npairTTL: '60'\n")
        settings, _ = load({}, BASE_ENV, path)
        self.assertEqual((settings.listen, settings.pair_ttl), ((port_endpoint(3000),), 60))

    def test_errors_never_echo_secrets(self):
        """A bad Redis URL (which may hold a password) is reported without its value."""
        message = self.error(environ=dict(BASE_ENV, REDIS_URL="http://user:hunter2@host"))
        self.assertEqual(
            message, "REDIS_URL (environment): REDIS_URL must start with redis://, rediss://, unix:// or redis+unix://"
        )
        for url in ("redis://:hunter2@", "redis://:hunter2@host:port/0", "unix://:hunter2@"):
            self.assertNotIn("hunter2", self.error(environ=dict(BASE_ENV, REDIS_URL=url)))

    def test_redis_url_that_means_something_else(self):
        """A REDIS_URL whose parts the registry would ignore or replace stops the start, naming REDIS_URL and its
        source, never the password."""
        for url in ("redis://:hunter2@h:0", "redis://:hunter2@h/-1", "redis://alice@h", "rediss://:hunter2@h?sslcert="):
            message = self.error({"redis_url": url}, BASE_ENV)
            self.assertTrue(message.startswith("--redis-url (flag): REDIS_URL: "), message)
            self.assertNotIn("hunter2", message)
        path = self.write_yaml("redisURL: redis://alice@h\n")
        self.assertEqual(
            self.error(environ=BASE_ENV, path=path),
            f"redisURL (file {path}): REDIS_URL: a user needs a password (user:password@)",
        )

    def test_every_redis_url_form_the_registry_takes(self):
        """REDIS_URL accepts the unix socket forms the registry connects to, as well as redis:// and rediss://."""
        for url in ("redis://h:6379/0", "rediss://:p@h", "unix:///run/redis.sock?db=1", "redis+unix:///run/r.sock"):
            settings, _ = load({}, dict(BASE_ENV, REDIS_URL=url))
            self.assertEqual(settings.redis_url, url)

    def test_unreadable_or_bad_yaml(self):
        """A missing or malformed --config file is a one-line error naming the file."""
        self.assertIn("cannot read", self.error(environ=BASE_ENV, path="/nonexistent.yaml"))
        path = self.write_yaml("upstream: [\n")
        self.assertIn("invalid YAML", self.error(environ=BASE_ENV, path=path))
        path = self.write_yaml("- a\n")
        self.assertIn("does not hold a mapping", self.error(environ=BASE_ENV, path=path))

    def test_yaml_not_utf8(self):
        """A --config file that is not UTF-8 (say, saved as Latin-1) is a one-line error, not a decoding traceback."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write("upstream: http://x\n# caf\u00e9\n".encode("latin-1"))
        self.assertEqual(
            self.error(environ=BASE_ENV, path=path), f"--config (flag): cannot read {path!r}: not UTF-8 text"
        )


class SecretTests(ConfigTestCase):
    def test_short_secret_warns(self):
        """A CLIENT_ID_SECRET under 32 characters is accepted with a warning that does not contain it."""
        _, warnings = load({}, dict(BASE_ENV, CLIENT_ID_SECRET="tooshort-secret"))
        short = [w for w in warnings if w.startswith("CLIENT_ID_SECRET")]
        self.assertEqual(len(short), 1)
        self.assertNotIn("tooshort-secret", short[0])
        _, warnings = load({}, BASE_ENV)
        self.assertFalse([w for w in warnings if w.startswith("CLIENT_ID_SECRET")])

    def test_repr_hides_secrets(self):
        """repr(settings) holds neither the client id secret, nor the outbound token, nor the Redis URL, nor the
        HEADERS (often an upstream API key)."""
        settings, _ = load(
            {},
            dict(
                BASE_ENV,
                OUTBOUND_TOKEN="token-value-xyz",
                REDIS_URL="redis://:pw-abc@redis.example:6379",
                HEADERS='{"Authorization": "Bearer api-key-123"}',
            ),
        )
        text = repr(settings)
        for secret in (SECRET, "token-value-xyz", "pw-abc", "api-key-123"):
            self.assertNotIn(secret, text)
        self.assertIn("http://up.example", text)

    def test_settings_frozen(self):
        """Settings cannot be changed once built."""
        settings = Settings(upstream="http://x", client_id_secrets=[SECRET])
        self.assertRaises(AttributeError, setattr, settings, "upstream", "http://y")
        self.assertEqual(settings.client_id_secrets, (SECRET,))


def read_env_file(path):
    """The variables of a systemd EnvironmentFile (KEY=value lines, optional single quotes, # comments)."""
    variables = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                name, _, value = line.partition("=")
                variables[name] = value[1:-1] if value[:1] == value[-1:] == "'" else value
    return variables


DEPLOY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy")


class DeployExampleTests(SynchronousTestCase):
    def test_example_env_files_load(self):
        """deploy/'s minimal and full environment files are valid configurations once given the secret they ship
        empty (a known placeholder would be accepted silently)."""
        minimal, _ = load({}, dict(read_env_file(os.path.join(DEPLOY, "mterelay.env.minimal")), CLIENT_ID_SECRET=SECRET))
        self.assertEqual(minimal.upstream, "https://api.my-company.com")
        full, _ = load({}, dict(read_env_file(os.path.join(DEPLOY, "mterelay.env.full")), CLIENT_ID_SECRET=SECRET))
        self.assertEqual(full.mte_routes, ("/api/v1/*", "/api/v2/*"))
        self.assertEqual(full.headers, (("x-service-name", "mte-relay"),))
        self.assertEqual(full.listen, (port_endpoint(3000),))
        self.assertEqual(full.log_format, "json")

    def test_keys_are_the_units_credentials(self):
        """The full example reads its keys (identity, TLS) where the unit hands them over as credentials: its dynamic
        user cannot read a root-owned key under /etc/mterelay."""
        with open(os.path.join(DEPLOY, "mterelay.env.full"), encoding="utf-8") as f:
            keys = re.findall(r"(?:IDENTITY_KEY=|privateKey=)([^:'\s]+)", f.read())
        with open(os.path.join(DEPLOY, "mterelay.service"), encoding="utf-8") as f:
            unit = f.read()
        self.assertEqual(len(keys), 2)
        for key in keys:
            directory, name = os.path.split(key)
            self.assertEqual(directory, "/run/credentials/mterelay.service")
            self.assertIn(f"\n#LoadCredential={name}:/etc/mterelay/", unit)
