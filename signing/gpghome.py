"""Private temporary GnuPG homes, and making sure no gpg-agent outlives a command.

A home's path must be short: gpg-agent's socket lives inside it and Unix socket paths
are limited to about 108 bytes, so homes are made directly under ``/tmp``.
"""

import contextlib
import os
import shutil
import subprocess
import tempfile

import gnupg

__all__ = ["private_home", "agent_running", "stop_agent", "open_gpg", "user_home"]

GPGCONF = "gpgconf"
GPG_CONNECT_AGENT = "gpg-connect-agent"


def agent_running(home):
    """True when a gpg-agent already serves ``home`` (checked without starting one)."""
    try:
        proc = subprocess.run(
            [GPG_CONNECT_AGENT, "--homedir", home, "--no-autostart", "/bye"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
    except OSError:
        return False
    return proc.returncode == 0


def stop_agent(home):
    """Stop every GnuPG daemon (agent, dirmngr, ...) serving ``home``; harmless if none."""
    with contextlib.suppress(OSError):
        subprocess.run(
            [GPGCONF, "--homedir", home, "--kill", "all"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )


def open_gpg(home):
    """A :class:`gnupg.GPG` bound to ``home`` (which must exist)."""
    return gnupg.GPG(gnupghome=home)


@contextlib.contextmanager
def private_home():
    """Yield the path of a fresh mode-700 GnuPG home; stop its agents and delete it after."""
    home = tempfile.mkdtemp(prefix="g", dir="/tmp")
    os.chmod(home, 0o700)
    try:
        yield home
    finally:
        stop_agent(home)
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def user_home(home):
    """Use an existing keyring ``home``; stop its agent afterwards only if we started it."""
    was_running = agent_running(home)
    try:
        yield home
    finally:
        if not was_running:
            stop_agent(home)
