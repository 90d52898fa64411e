"""``xcflushd check-backend`` (probe.py) against the real simulator over HTTP: the rollout's
health gate relies on it to see a wrong provider key on a node that has nothing to report."""

import subprocess
import sys

import pytest
from xcftest import free_port


def check_backend(tmp_path, backend, provider_key=None, tokens=None, *extra):
    argv = [sys.executable, "-m", "xcflushd", "check-backend", "-c", "/dev/null", "--backend", backend]
    if provider_key is not None:
        (tmp_path / "pk").write_text(provider_key + "\n")
        argv += ["--provider-key-file", str(tmp_path / "pk")]
    if tokens is not None:
        (tmp_path / "tokens").write_text("".join(f"{s}={t}\n" for s, t in tokens.items()))
        argv += ["--service-tokens-file", str(tmp_path / "tokens")]
    proc = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout, proc.stderr


def test_an_accepted_provider_key_exits_0_and_reports_nothing(tmp_path, sim):
    code, out, err = check_backend(tmp_path, sim.url, "pk-test")
    assert (code, err) == (0, ""), out
    assert out == "ok: provider key accepted (application_not_found)\n"
    calls = sim.backend.calls()
    assert calls["report"] == 0 and sum(calls.values()) == 1, calls  # one read-only call


@pytest.mark.parametrize("key", ["pk-wrong", "pk-test-"])
def test_a_refused_provider_key_is_named_and_never_echoed(tmp_path, sim, key):
    code, out, _ = check_backend(tmp_path, sim.url, key)
    assert code == 1
    assert out.startswith("FAILED: the backend refused the provider key (HTTP 403 "
                          "provider_key_invalid_or_service_missing"), out
    assert key not in out


def test_each_service_token_is_checked_on_its_own_service(tmp_path, sim):
    code, out, _ = check_backend(tmp_path, sim.url, None, {"555": "st-555", "777": "st-nope"})
    assert code == 1
    assert out.splitlines() == [
        "ok: service token of service 555 accepted (application_not_found)",
        "FAILED: the backend refused the service token of service 777 (HTTP 403 service_token_invalid: "
        'service token "..." or service id "777" is invalid)',
    ], out
    assert "st-nope" not in out


def test_an_unreachable_backend_fails_with_the_reason(tmp_path):
    code, out, _ = check_backend(tmp_path, f"http://127.0.0.1:{free_port()}", "pk-test",
                                 None, "--backend-connect-timeout", "1")
    assert code == 1
    assert "FAILED: backend not reached with the provider key" in out and "Could not connect" in out, out


def test_without_credentials_it_is_a_config_error(tmp_path, sim):
    code, out, err = check_backend(tmp_path, sim.url)
    assert code == 2 and out == ""
    assert err.startswith("xcflushd: error: no backend credentials") and len(err.splitlines()) == 1
