"""Options from flags, environment and config file; validation errors are one
line on stderr with exit status 2, never a traceback."""

import os
import subprocess
import sys

import pytest
import redis

from xcflushd.cli import build_parser, main
from xcflushd.config import build_settings


def settings(argv, environ=None, config_files=()):
    environ = {} if environ is None else environ
    return build_settings(build_parser(list(config_files)).parse_args(argv, env_vars=environ), environ)


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "provider_key"
    path.write_text("pk-from-file\n")
    return str(path)


def test_defaults(key_file):
    s = settings(["run", "--provider-key-file", key_file])
    assert s.provider_key == "pk-from-file"
    assert s.redis_url == "redis://localhost:6379"
    assert s.backend_url == "https://su1.3scale.net"
    assert (s.frequency, s.auth_ttl, s.report_auth_wait, s.report_batch_size) == (300, 900, 5.0, 1000)
    assert s.max_term_wait == 30


def test_flags_win_over_env_and_env_over_file(tmp_path, key_file):
    conf = tmp_path / "xcflushd.conf"
    conf.write_text("frequency = 11\nauth-ttl = 100\nthreads = 3\nredis = filehost:1\n")
    env = {"XCFLUSHD_FREQUENCY": "22", "XCFLUSHD_REDIS": "envhost:2"}
    s = settings(["run", "-c", str(conf), "--provider-key-file", key_file, "--frequency", "33"], env)
    assert s.frequency == 33
    assert s.redis_url == "redis://envhost:2"
    assert s.threads == 3 and s.auth_ttl == 100


def test_default_config_file_is_read_when_present(tmp_path, key_file):
    conf = tmp_path / "xcflushd.conf"
    conf.write_text("auth-ttl = 1234\n")
    assert settings(["run", "--provider-key-file", key_file], config_files=[str(conf)]).auth_ttl == 1234
    assert settings(["run", "--provider-key-file", key_file], config_files=[str(tmp_path / "absent")]).auth_ttl == 900


def test_secrets_from_env_config_and_credentials_directory(tmp_path):
    assert settings(["run"], {"XCFLUSHD_PROVIDER_KEY": "pk-env"}).provider_key == "pk-env"
    conf = tmp_path / "c.conf"
    conf.write_text("provider-key = pk-conf\nservice-token = [1=t1, 2=t2]\n")
    s = settings(["run", "-c", str(conf)])
    assert s.provider_key == "pk-conf" and s.service_tokens == {"1": "t1", "2": "t2"}
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "provider_key").write_text("pk-cred\n")
    (creds / "service_tokens").write_text("# comment\n555 = st-555\n")
    (creds / "redis_password").write_text("hunter2\n")
    s = settings(["run"], {"CREDENTIALS_DIRECTORY": str(creds)})
    assert (s.provider_key, s.service_tokens, s.redis_password) == ("pk-cred", {"555": "st-555"}, "hunter2")
    assert "pk-cred" not in repr(s) and "hunter2" not in repr(s)


def test_threads_accept_the_legacy_min_max_form(key_file):
    s = settings(["run", "--provider-key-file", key_file, "-t", "2:12", "-p", "5"])
    assert (s.threads, s.prio_threads) == (12, 5)


@pytest.mark.parametrize("backend,secure,expected", [
    ("su1.3scale.net", None, "https://su1.3scale.net"),
    ("su1.3scale.net", "--no-secure", "http://su1.3scale.net"),
    ("http://127.0.0.1:8081", None, "http://127.0.0.1:8081"),
    ("https://b.example:8443/", "--secure", "https://b.example:8443"),
])
def test_backend_scheme_and_secure_flag(key_file, backend, secure, expected):
    argv = ["run", "--provider-key-file", key_file, "-b", backend] + ([secure] if secure else [])
    assert settings(argv).backend_url == expected


@pytest.mark.parametrize("redis_arg,expected", [
    ("myhost", "redis://myhost:6379"),
    ("myhost:7000", "redis://myhost:7000"),
    ("rediss://user:pw@host:6380/1", "rediss://user:pw@host:6380/1"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
])
def test_redis_forms(key_file, redis_arg, expected):
    env = {"XCFLUSHD_REDIS": redis_arg}
    assert settings(["run", "--provider-key-file", key_file], env).redis_url == expected


BAD = [
    (["--frequency", "0"], "--frequency"),
    (["--frequency", "abc"], "--frequency"),
    (["--frequency", "1000", "--auth-ttl", "10"], "must not exceed --auth-ttl"),
    (["--auth-ttl", "-5"], "--auth-ttl"),
    (["--threads", "0"], "--threads"),
    (["--threads", "9:2"], "min 9 is above max 2"),
    (["--prio-threads", "x"], "--prio-threads"),
    (["--report-batch-size", "5000"], "at most 1000"),
    (["--report-batch-size", "0"], "--report-batch-size"),
    (["--report-auth-wait", "-1"], "--report-auth-wait"),
    (["--backend-connect-timeout", "0"], "--backend-connect-timeout"),
    (["--backend-read-timeout", "soon"], "--backend-read-timeout"),
    (["--max-term-wait", "0"], "--max-term-wait"),
    (["--log-level", "loud"], "--log-level"),
    (["--backend", "ftp://x"], "scheme must be http or https"),
    (["--backend", "http://x", "--secure"], "contradicts --secure"),
    (["--backend", "https://x", "--no-secure"], "contradicts --no-secure"),
    (["--backend", "http://x:notaport"], "bad port"),
    (["--redis", "host:notaport"], "--redis"),
    (["--redis", "mongodb://x"], "unsupported scheme"),
    (["--backend-proxy", "socks://p"], "--backend-proxy"),
    (["--provider-key-file", "/nonexistent/key"], "cannot read /nonexistent/key"),
    (["--service-tokens-file", "/nonexistent/tokens"], "cannot read"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["-k", "pk-visible"], "refusing --provider-key on the command line"),
    (["--provider-key=pk-visible"], "refusing --provider-key"),
    (["--service-token", "1=tok"], "refusing --service-token"),
    (["--redis", "redis://:pw@host:1"], "refusing a Redis password"),
    # Added by the reliability suite (issue 7): every option, and values that parse but cannot work.
    (["--auth-ttl", "abc"], "--auth-ttl"),
    (["--auth-ttl", "99999999999999999999"], "--auth-ttl: expected a number up to"),
    (["--frequency", "nan"], "--frequency"),
    (["--threads", "1:x"], "--threads"),
    (["--threads", "100000000"], "--threads: expected a number up to 1000"),
    (["--prio-threads", "0"], "--prio-threads"),
    (["--report-batch-size", "abc"], "--report-batch-size"),
    (["--report-auth-wait", "nan"], "--report-auth-wait"),
    (["--report-auth-wait", "inf"], "--report-auth-wait"),
    (["--backend-read-timeout", "inf"], "--backend-read-timeout"),
    (["--max-term-wait", "nan"], "--max-term-wait"),
    (["--backend", "http://"], "--backend: expected scheme://host"),
    (["--backend", "https://user:pw@x"], "refusing a password in a URL"),
    (["--backend", "https://user@x"], "without credentials"),
    (["--backend", "https://x/?q=1"], "without credentials or query"),
    (["--backend-proxy", "http://p:notaport"], "--backend-proxy: bad port"),
    (["--redis", "unix://"], "unix:// needs a socket path"),
    (["--redis", "host:70000"], "--redis"),
    (["--redis", "redis://:1"], "--redis: no host"),
    (["--redis-password-file", "/nonexistent/redis-secret"], "--redis-password-file: cannot read"),
    (["--service-tokens-file", "/dev/null"], "is empty"),
    (["--backend-outage", "open"], "--backend-outage: expected one of strict, resilient, allow, got 'open'"),
    (["--backend-outage", "resilient", "--max-stale", "0"], "--max-stale: must be > 0"),
    (["--backend-outage", "allow", "--max-stale", "900"], "--max-stale (900) must exceed --auth-ttl (900)"),
    (["--max-stale", "1h"], "--max-stale: expected a whole number"),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_options_one_line_exit_2(capsys, tmp_path, key_file, extra, message):
    argv = ["run"] + (["--provider-key-file", key_file] if "--provider-key-file" not in extra else []) + extra
    code = main(argv, environ={})
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("xcflushd: error: ")
    assert "pk-visible" not in err and "tok" not in err.replace("token", "") and "pw" not in err


def test_no_credentials_at_all(capsys):
    assert main(["run"], environ={}) == 2
    assert "no backend credentials" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("frequency = 5\nnonsense-key = 1\n", "unrecognized arguments"),
    ("[section\nfrequency = \n", ""),
])
def test_bad_config_file(capsys, tmp_path, key_file, content, message):
    conf = tmp_path / "bad.conf"
    conf.write_text(content)
    code = main(["run", "-c", str(conf), "--provider-key-file", key_file], environ={})
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_missing_config_file(capsys, key_file):
    assert main(["run", "-c", "/nonexistent.conf", "--provider-key-file", key_file], environ={}) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_version_and_bad_command_as_a_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
    version = subprocess.run([sys.executable, "-m", "xcflushd", "--version"], capture_output=True, text=True, env=env)
    assert version.returncode == 0 and version.stdout.startswith("xcflushd ")
    bad = subprocess.run([sys.executable, "-m", "xcflushd", "explode"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


# ---- check-config: the same reading as `run`, nothing contacted ------------------------


@pytest.mark.parametrize("extra,message", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_check_config_rejects_what_run_rejects(capsys, key_file, extra, message):
    argv = (["--provider-key-file", key_file] if "--provider-key-file" not in extra else []) + extra
    assert main(["run", *argv], environ={}) == 2
    run_err = capsys.readouterr().err
    assert main(["check-config", *argv], environ={}) == 2
    captured = capsys.readouterr()
    assert captured.err == run_err and captured.out == ""


def test_check_config_ok_is_one_line_without_secrets(capsys, tmp_path, redis_server):
    conf = tmp_path / "xcflushd.conf"
    conf.write_text(f"redis = {redis_server.address}\nbackend = http://127.0.0.1:9\nfrequency = 7\n"
                    "backend-proxy = http://proxyuser:proxy-pw@127.0.0.1:3128\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "provider_key").write_text("pk-cred-secret\n")
    (creds / "service_tokens").write_text("555=st-secret\n777=st-other\n")
    (creds / "redis_password").write_text("redis-secret\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    client = redis.Redis(port=redis_server.port)
    connections = client.info("stats")["total_connections_received"]

    assert main(["check-config", "-c", str(conf)], environ=env) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.count("\n") == 1 and out.startswith("config OK: "), out
    assert f"redis redis://{redis_server.address}" in out and "backend http://127.0.0.1:9" in out
    assert "frequency 7s" in out and "provider key, 2 service token(s), redis password, proxy password" in out
    assert "backend proxy http://127.0.0.1:3128 (with a user name)" in out
    for secret in ("pk-cred-secret", "st-secret", "st-other", "redis-secret", "proxy-pw", "proxyuser"):
        assert secret not in out
    # Touched nothing: no connection but our own (kept in the client's pool) ever reached Redis.
    assert client.info("stats")["total_connections_received"] == connections


@pytest.mark.parametrize("content,message", [
    ("frequency = 5m\n", "--frequency: expected a whole number, got '5m'"),
    ("frequency = 1000\nauth-ttl = 10\n", "must not exceed --auth-ttl"),
    ("nonsense-key = 1\n", "unrecognized arguments"),
])
def test_check_config_of_a_bad_file_as_a_process(tmp_path, key_file, content, message):
    conf = tmp_path / "candidate.conf"
    conf.write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("XCFLUSHD_")}
    proc = subprocess.run([sys.executable, "-m", "xcflushd", "check-config", "-c", str(conf),
                           "--provider-key-file", key_file], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.startswith("xcflushd: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_check_config_without_credentials_fails_like_run(capsys, tmp_path):
    conf = tmp_path / "xcflushd.conf"
    conf.write_text("frequency = 5\n")
    assert main(["check-config", "-c", str(conf)], environ={}) == 2
    assert "no backend credentials" in capsys.readouterr().err


def test_backend_outage_from_flag_env_and_file_and_in_check_config(capsys, tmp_path, key_file):
    assert (settings(["run", "--provider-key-file", key_file]).backend_outage,
            settings(["run", "--provider-key-file", key_file]).max_stale) == ("strict", 3600)
    s = settings(["run", "--provider-key-file", key_file], {"XCFLUSHD_BACKEND_OUTAGE": "Allow"})
    assert s.backend_outage == "allow"
    conf = tmp_path / "xcflushd.conf"
    conf.write_text("backend-outage = resilient\nmax-stale = 7200\n")
    s = settings(["run", "-c", str(conf), "--provider-key-file", key_file])
    assert (s.backend_outage, s.max_stale) == ("resilient", 7200)

    assert main(["check-config", "-c", str(conf), "--provider-key-file", key_file], environ={}) == 0
    assert "backend-outage resilient (max-stale 7200s)" in capsys.readouterr().out
    assert main(["check-config", "--provider-key-file", key_file], environ={}) == 0
    assert "backend-outage strict, " in capsys.readouterr().out
