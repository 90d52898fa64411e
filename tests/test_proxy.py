"""Backend calls through a real squid: forward proxying, CONNECT tunnels to an
https backend behind its own CA, Basic auth accepted and refused, Digest, and the
proxy environment (``http_proxy``, ``HTTPS_PROXY``, ``NO_PROXY``) as libcurl
reads it. Each case runs ``xcflushd flush`` (the daemon's real flush path)
against real Redis and the simulator; squid's access log proves whether the
traffic went through the proxy.
"""

import shutil
import ssl
import subprocess
import urllib.parse

import pytest
from lab.squid import Squid
from xcftest import DEMO_CONFIG

from xcflushd.keys import Credentials, report_key
from xcflushd_sim.gateway import Gateway
from xcflushd_sim.server import Simulator

USER = "alice"
PASSWORD = "pr0xy s3cr:t@!"   # spaces, a colon and an at sign: each must survive the trip
A1 = Credentials({"app_id": "a1b2c3", "app_key": "s3cr3t"})
pytestmark = pytest.mark.slow  # squid and a daemon process per case: ~15 s in all

PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY",
                   "no_proxy", "NO_PROXY")


@pytest.fixture(scope="module")
def squid():
    proxy = Squid(users={USER: PASSWORD})
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def digest_squid():
    proxy = Squid(users={USER: PASSWORD}, auth="digest")
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def backend_ca(tmp_path_factory):
    """A private CA and a certificate it signed for 127.0.0.1: (CA file, server context)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl not installed")
    d = tmp_path_factory.mktemp("ca")

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=xcflushd test CA", "-keyout", "ca.key",
            "-out", "ca.pem", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "ext", "-out", "server.pem")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "server.pem", d / "server.key")
    return str(d / "ca.pem"), context


@pytest.fixture
def https_sim(backend_ca):
    with Simulator(DEMO_CONFIG, tls=backend_ca[1]).start() as simulator:
        yield simulator


@pytest.fixture
def secrets(tmp_path):
    (tmp_path / "pk").write_text("pk-test\n")
    (tmp_path / "proxy-password").write_text(PASSWORD + "\n")
    (tmp_path / "wrong-password").write_text("not the password\n")
    return tmp_path


def no_proxy_environment(**variables):
    """The daemon's environment: no proxy variable of ours leaks in, only these."""
    env = {name: None for name in PROXY_VARIABLES}
    env.update(variables)
    return env


def flush(daemon_process, redis_server, backend, secrets, *extra, env=None):
    daemon = daemon_process(["flush", "--redis", redis_server.address, "--backend", backend.url,
                             "--provider-key-file", str(secrets / "pk"), "-c", "/dev/null",
                             "--report-auth-wait", "0", *extra], env=env or no_proxy_environment())
    code = daemon.proc.wait(30)
    out = daemon.output()
    assert "Traceback" not in out and PASSWORD not in out, out
    return code, out


def through(squid, since, method=None):
    """Access-log lines written since ``since`` (a count of lines), optionally of one method,
    without the 407 challenges: offered Basic, Digest and NTLM, libcurl first asks which one
    the proxy wants, once per connection."""
    return [line for line in squid.log()[since:]
            if line[3] != "TCP_DENIED/407" and (method is None or line[5] == method)]


def challenges(squid, since):
    return [line for line in squid.log()[since:] if line[3] == "TCP_DENIED/407"]


def proxy_flags(squid, password_file):
    host = squid.url.split("://", 1)[1]
    return ["--backend-proxy", f"http://{USER}@{host}", "--backend-proxy-password-file", str(password_file)]


def env_proxy_url(squid):
    host = squid.url.split("://", 1)[1]
    return f"http://{USER}:{urllib.parse.quote(PASSWORD, safe='')}@{host}"


def test_an_http_backend_through_the_proxy_with_basic_auth(squid, r, redis_server, sim, secrets, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 3)
    since = len(squid.log())
    code, out = flush(daemon_process, redis_server, sim, secrets, *proxy_flags(squid, secrets / "proxy-password"))
    assert code == 0, out
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 3}
    posts = through(squid, since, "POST")
    assert [(line[3], line[6], line[7]) for line in posts] == \
        [("TCP_MISS/202", f"{sim.url}/transactions.xml", USER)]
    gets = through(squid, since, "GET")
    assert gets and all(line[3] == "TCP_MISS/200" and line[7] == USER for line in gets)
    assert len(gets) == sim.backend.calls()["authorize"]  # every call went through squid
    assert not r.exists(report_key("555", A1))


def test_an_https_backend_through_a_connect_tunnel(squid, r, redis_server, https_sim, backend_ca, secrets,
                                                   daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 4)
    since = len(squid.log())
    code, out = flush(daemon_process, redis_server, https_sim, secrets,
                      *proxy_flags(squid, secrets / "proxy-password"), "--backend-ca-file", backend_ca[0])
    assert code == 0, out
    assert https_sim.backend.received()["555"]["a1b2c3"] == {"hits": 4}
    tunnels = through(squid, since)
    host = https_sim.url.split("://", 1)[1]
    assert tunnels and all((line[3], line[5], line[6], line[7]) == ("TCP_TUNNEL/200", "CONNECT", host, USER)
                           for line in tunnels)
    assert not r.exists(report_key("555", A1))


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_digest_auth_through_the_proxy(scheme, digest_squid, r, redis_server, sim, https_sim, backend_ca, secrets,
                                       daemon_process):
    backend = sim if scheme == "http" else https_sim
    Gateway(r).cache_report("555", A1, "hits", 5)
    since = len(digest_squid.log())
    code, out = flush(daemon_process, redis_server, backend, secrets,
                      *proxy_flags(digest_squid, secrets / "proxy-password"), "--backend-ca-file", backend_ca[0])
    assert code == 0, out
    assert backend.backend.received()["555"]["a1b2c3"] == {"hits": 5}
    passed = through(digest_squid, since)
    assert passed and all(line[7] == USER for line in passed)
    assert not r.exists(report_key("555", A1))


def test_the_private_ca_is_what_makes_the_backend_trusted(squid, r, redis_server, https_sim, secrets,
                                                          daemon_process):
    """The control for the case above: without --backend-ca-file the tunnel opens, TLS refuses."""
    Gateway(r).cache_report("555", A1, "hits", 2)
    code, out = flush(daemon_process, redis_server, https_sim, secrets,
                      *proxy_flags(squid, secrets / "proxy-password"))
    assert code == 1
    assert "certificate" in out and "failed=1" in out
    assert https_sim.backend.calls()["report"] == 0
    assert r.hgetall(report_key("555", A1)) == {"hits": "2"}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_refused_proxy_password_is_one_clear_line_and_keeps_every_report(
        scheme, squid, r, redis_server, sim, https_sim, backend_ca, secrets, daemon_process):
    backend = sim if scheme == "http" else https_sim
    apps = [Credentials({"app_id": f"app{i}", "app_key": "k"}) for i in range(5)] + [A1]
    for creds in apps:
        Gateway(r).cache_report("555", creds, "hits", 7)
    since = len(squid.log())
    code, out = flush(daemon_process, redis_server, backend, secrets,
                      *proxy_flags(squid, secrets / "wrong-password"), "--backend-ca-file", backend_ca[0])
    assert code == 1
    assert "not the password" not in out
    assert backend.backend.calls()["report"] == 0
    for creds in apps:
        assert r.hgetall(report_key("555", creds)) == {"hits": "7"}
    assert through(squid, since) == [] and challenges(squid, since)
    refusals = [line for line in out.splitlines() if "HTTP 407" in line]  # not "407" alone: a port can hold it
    assert refusals, out
    assert all("proxy" in line.lower() for line in refusals), out


@pytest.mark.parametrize("variable", ["https_proxy", "HTTPS_PROXY", "ALL_PROXY"])
def test_https_proxy_from_the_environment(variable, squid, r, redis_server, https_sim, backend_ca, secrets,
                                          daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 5)
    since = len(squid.log())
    code, out = flush(daemon_process, redis_server, https_sim, secrets, "--backend-ca-file", backend_ca[0],
                      env=no_proxy_environment(**{variable: env_proxy_url(squid)}))
    assert code == 0, out
    assert https_sim.backend.received()["555"]["a1b2c3"] == {"hits": 5}
    tunnels = through(squid, since, "CONNECT")
    assert tunnels and all(line[3] == "TCP_TUNNEL/200" and line[7] == USER for line in tunnels)


@pytest.mark.parametrize("variable,proxied", [("http_proxy", True), ("ALL_PROXY", True),
                                              ("HTTP_PROXY", False)])  # upper case: ignored (httpoxy)
def test_http_proxy_from_the_environment_as_curl_reads_it(variable, proxied, squid, r, redis_server, sim,
                                                          secrets, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 6)
    since = len(squid.log())
    code, out = flush(daemon_process, redis_server, sim, secrets,
                      env=no_proxy_environment(**{variable: env_proxy_url(squid)}))
    assert code == 0, out
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 6}
    posts = through(squid, since, "POST")
    assert len(posts) == (1 if proxied else 0)


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "127.0.0.0/8", "*"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_no_proxy_reaches_the_backend_directly(no_proxy, scheme, squid, r, redis_server, sim, https_sim,
                                               backend_ca, secrets, daemon_process):
    backend = sim if scheme == "http" else https_sim
    Gateway(r).cache_report("555", A1, "hits", 8)
    since = len(squid.log())
    proxy = env_proxy_url(squid)
    env = no_proxy_environment(http_proxy=proxy, HTTP_PROXY=proxy, https_proxy=proxy, HTTPS_PROXY=proxy,
                               ALL_PROXY=proxy, NO_PROXY=no_proxy)
    code, out = flush(daemon_process, redis_server, backend, secrets, "--backend-ca-file", backend_ca[0], env=env)
    assert code == 0, out
    assert backend.backend.received()["555"]["a1b2c3"] == {"hits": 8}
    assert through(squid, since) == []


def test_no_proxy_also_applies_to_backend_proxy(squid, r, redis_server, sim, secrets, daemon_process):
    Gateway(r).cache_report("555", A1, "hits", 9)
    since = len(squid.log())
    code, out = flush(daemon_process, redis_server, sim, secrets, *proxy_flags(squid, secrets / "proxy-password"),
                      env=no_proxy_environment(NO_PROXY="127.0.0.1"))
    assert code == 0, out
    assert sim.backend.received()["555"]["a1b2c3"] == {"hits": 9}
    assert through(squid, since) == []

