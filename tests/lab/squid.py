"""A real forward proxy for tests: Debian's squid on a free loopback port.

``Squid(users={"alice": "secret"})`` starts ``squid -N`` with a private
config in a temp dir: Basic auth against an htpasswd file (apache2-utils),
no cache, every request (CONNECT tunnels included) in ``access.log``, which
``log()`` reads back so a test can prove traffic went through the proxy, or
did not. ``auth="digest"`` asks for Digest instead (a file of HA1 hashes
read by digest_file_auth). Without ``users`` the proxy is open to
loopback clients.
"""

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import pytest
from xcftest import free_port

SQUID = "/usr/sbin/squid"
NCSA_AUTH = "/usr/lib/squid/basic_ncsa_auth"
DIGEST_AUTH = "/usr/lib/squid/digest_file_auth"
REALM = "xcflushd-test"


class Squid:
    def __init__(self, users: Optional[Dict[str, str]] = None, auth: str = "basic"):
        for tool in (SQUID, NCSA_AUTH, DIGEST_AUTH, shutil.which("htpasswd")):
            if not tool or not os.path.exists(tool):
                pytest.fail("squid or htpasswd not installed: run `make deps` (squid, apache2-utils)")
        self.dir = tempfile.mkdtemp(prefix="xcf-squid-")
        self.port = free_port()
        self.access_log = os.path.join(self.dir, "access.log")
        lines = [f"http_port 127.0.0.1:{self.port}", "visible_hostname xcflushd-test"]
        if users and auth == "digest":
            passwd = os.path.join(self.dir, "digest-passwd")
            with open(passwd, "w") as fh:  # user:realm:HA1 (-c): a password may hold a colon
                fh.writelines(f"{user}:{REALM}:{hashlib.md5(f'{user}:{REALM}:{password}'.encode()).hexdigest()}\n"
                              for user, password in users.items())
            lines += [f"auth_param digest program {DIGEST_AUTH} -c {passwd}", f"auth_param digest realm {REALM}",
                      "acl authed proxy_auth REQUIRED", "http_access allow authed"]
        elif users:
            passwd = os.path.join(self.dir, "passwd")
            for i, (user, password) in enumerate(users.items()):
                # -i: the password on stdin, never in argv
                subprocess.run(["htpasswd", "-i", *(["-c"] if i == 0 else []), passwd, user],
                               input=password, text=True, check=True, capture_output=True)
            lines += [f"auth_param basic program {NCSA_AUTH} {passwd}", "auth_param basic realm xcflushd-test",
                      "acl authed proxy_auth REQUIRED", "http_access allow authed"]
        else:
            lines += ["acl loopback src 127.0.0.1/32", "http_access allow loopback"]
        lines += ["http_access deny all", "cache deny all",
                  f"access_log stdio:{self.access_log}", f"cache_log {self.dir}/cache.log",
                  f"pid_filename {self.dir}/squid.pid", f"coredump_dir {self.dir}",
                  "shutdown_lifetime 1 seconds"]
        if os.getuid() == 0:  # squid drops root for this user, who must own its files
            lines.append("cache_effective_user proxy")
            proxy = pwd.getpwnam("proxy")
            os.chown(self.dir, proxy.pw_uid, proxy.pw_gid)
            for name in os.listdir(self.dir):
                os.chown(os.path.join(self.dir, name), proxy.pw_uid, proxy.pw_gid)
        self.conf = os.path.join(self.dir, "squid.conf")
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        self.proc = subprocess.Popen([SQUID, "-N", "-f", self.conf], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self._wait_listening()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_listening(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.close()
        raise RuntimeError(f"squid did not start; cache.log:\n{self._cache_log()[-2000:]}")

    def _cache_log(self) -> str:
        try:
            with open(os.path.join(self.dir, "cache.log")) as fh:
                return fh.read()
        except OSError:
            return ""

    def log(self) -> List[List[str]]:
        """The access log so far, one list of fields per request: [time, ms, client, result/code,
        bytes, method, URL, user, hierarchy, type]. Squid writes a line when a request ends."""
        try:
            with open(self.access_log) as fh:
                return [line.split() for line in fh if line.strip()]
        except FileNotFoundError:
            return []

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # nothing to save (no cache); SIGTERM would wait shutdown_lifetime
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
