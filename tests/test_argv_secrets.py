"""Every secret-bearing option: refused on the command line (where `ps` shows it) in
every spelling argparse accepts, without the secret in the error; still taken from the
environment and the config file."""

import pytest
from hypothesis import assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from xcflushd.cli import build_parser, main, refuse_visible_secrets
from xcflushd.config import build_settings
from xcflushd.errors import ConfigError

S = "s3cr3t-Xq9"  # the secret: must never appear in an error message


def from_env_and_file(argv, environ, config_text, tmp_path):
    conf = tmp_path / "xcflushd.conf"
    conf.write_text(config_text)
    return build_settings(build_parser([str(conf)]).parse_args(argv, env_vars=environ), environ)


# option, argv spellings, environment, config file line, where the settings keep it
SECRETS = [
    ("--provider-key",
     [["-k", S], ["-k" + S], ["-k=" + S], ["--provider-key", S], ["--provider-key=" + S]],
     {"XCFLUSHD_PROVIDER_KEY": S}, f"provider-key = {S}\n",
     lambda s: s.provider_key),
    ("--service-token",
     [["--service-token", f"7={S}"], [f"--service-token=7={S}"]],
     {"XCFLUSHD_SERVICE_TOKEN": f"[7={S}]"}, f"service-token = [7={S}]\n",
     lambda s: s.service_tokens["7"]),
    ("--redis",
     [["-r", f"redis://:{S}@db:6380/0"], [f"-rredis://:{S}@db:6380"], [f"-r=redis://u:{S}@db"],
      ["--redis", f"rediss://user:{S}@db:6380"], [f"--redis=redis://:{S}@db"],
      [f"--redi=redis://:{S}@db"], ["--redis", f"unix://:{S}@/run/redis.sock"],
      ["--redis", f"redis://db:6379/0?password={S}"]],
     {"XCFLUSHD_REDIS": f"redis://:{S}@db:6380"}, f"redis = redis://:{S}@db:6380\n",
     lambda s: s.redis_url),
    ("--backend-proxy",
     [["--backend-proxy", f"http://user:{S}@proxy:3128"], [f"--backend-proxy=http://u:{S}@proxy:3128"],
      ["--backend-proxy", f"https://:{S}@proxy:3128"], ["--backend-p", f"http://u:{S}@proxy:3128"]],
     {"XCFLUSHD_BACKEND_PROXY": f"http://user:{S}@proxy:3128"}, f"backend-proxy = http://user:{S}@proxy:3128\n",
     lambda s: s.backend_proxy_password or ""),
]
ARGV_CASES = [(opt, spelling) for opt, spellings, *_ in SECRETS for spelling in spellings]


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "provider_key"
    path.write_text("pk-from-file\n")
    return str(path)


@pytest.mark.parametrize("option,spelling", ARGV_CASES, ids=[" ".join(c[1]) for c in ARGV_CASES])
def test_on_the_command_line_refused_without_quoting_the_secret(capsys, key_file, option, spelling):
    for argv in (["run", "--provider-key-file", key_file, *spelling], [*spelling, "flush"]):
        assert main(argv, environ={}) == 2
        err = capsys.readouterr().err
        assert err.startswith("xcflushd: error: refusing ") and err.count("\n") == 1
        assert option in err and "where ps shows it" in err
        assert S not in err


@pytest.mark.parametrize("option,environ,config,kept", [(o, e, c, k) for o, _, e, c, k in SECRETS],
                         ids=[s[0] for s in SECRETS])
def test_environment_and_config_file_still_take_it(tmp_path, key_file, option, environ, config, kept):
    base = ["run"] if option == "--provider-key" else ["run", "--provider-key-file", key_file]
    assert S in kept(from_env_and_file(base, environ, "", tmp_path))
    assert S in kept(from_env_and_file(base, {}, config, tmp_path))


@pytest.mark.parametrize("argv", [
    ["--redis", "redis://user@db:6380/0"], ["-r", "db:6380"], ["-rdb:6380"],
    ["--redis", "unix:///run/redis/redis.sock"], ["--backend-proxy", "http://proxy:3128"],
    ["--backend-proxy", "http://user@proxy:3128"], ["--backend", "http://backend:3000"],
    ["--redis-password-file", "/dev/null", "--redis", "redis://db:1"],
])
def test_urls_without_a_password_are_fine(argv):
    refuse_visible_secrets(["run", *argv])


@pytest.mark.parametrize("argv", [
    ["run", "--", f"redis://:{S}@db"],          # a positional after --
    [f"http://u:{S}@proxy:1"],                    # where the command goes
    ["run", "--backend", f"https://u:{S}@x"],    # an option that never takes credentials
])
def test_a_url_password_anywhere_else_is_refused_too(capsys, argv):
    assert main(argv, environ={}) == 2
    err = capsys.readouterr().err
    assert "refusing a password in a URL" in err and S not in err and err.count("\n") == 1


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@hsettings(max_examples=150, deadline=None)
@given(argv=st.lists(st.one_of(_text, st.sampled_from(
    ["-r", "-k", "--redis", "--backend-proxy", "--", "--redis=", "-r=", "--b", "--provider-key-file"])),
    max_size=8))
def test_any_argv_is_refused_or_passed_never_crashes(argv):
    try:
        refuse_visible_secrets(argv)
    except ConfigError as exc:
        assert str(exc).startswith("refusing ") and "\n" not in str(exc)


@hsettings(max_examples=100, deadline=None)
@given(secret=st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc"), blacklist_characters="@/?#:"),
                      min_size=4, max_size=20),
       form=st.integers(0, 3))
def test_no_password_spelling_slips_through(secret, form):
    def spelled(password):
        url = f"redis://:{password}@db:6379"
        return [["-r", url], ["-r" + url], ["--redis", url], ["--redis=" + url]][form]

    with pytest.raises(ConfigError) as raised:
        refuse_visible_secrets(["run", *spelled(secret)])
    # A short secret may spell a word of the message itself ("XCFL" of XCFLUSHD_REDIS, "--re"
    # of --redis): the same argv with another password says which.
    with pytest.raises(ConfigError) as baseline:
        refuse_visible_secrets(["run", *spelled("\x00")])
    assume(secret not in str(baseline.value))
    assert secret not in str(raised.value)
