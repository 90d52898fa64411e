"""End to end: ansible/site.yml rolls the signed release out to three real systemd nodes.

The fleet's inventory is made by the deployment walk-through's own commands (tests/deploy/
walkthrough.py reads them from the docs), and the runs marked "(walk-through)" below are
its commands, run as written: the docs cannot drift from what works.

The tests run in order on one fleet (module scope), each starting from the state the one
before left, as an operator's runs would:

1. --check --diff on a fresh node (gw1): shows the config to come, changes nothing, leaves nothing;
2. (walk-through) the check, then the first rollout of release 1 with the documented canary
   ramp from the inventory (gw1, then gw2 and gw3): every node runs xcflushd, active and
   READY, flushing;
3. the same run again (on gw1) changes nothing;
4. --check --diff on a converged node (gw1) with a config change: the diff and the reload shown, nothing done;
5. a config change alone (on gw1) reloads the same process, which then runs on the new config;
6. a config and unit change restarts the nodes one batch (one node) at a time;
7. a wrong provider key: the health gate fails gw1 and the rollout stops there;
8. a run that fails after the config write, then its rerun: the restart is not lost;
9. bad variables, a tampered (or unlisted) release: the play stops before any node;
10. (walk-through) release 2 in its own directory, pinned in the inventory, while the canary
    gw1 cannot restart: gw1 failed, gw2 and gw3 untouched (release 1, same process);
11. (walk-through) gw1 fixed, the run resumed at it (--limit gw1): installed, restarted, up;
12. (walk-through) the rollback to release 1 pinned in the inventory, run from the collection
    as ansible-galaxy installs it: only gw1 changes.

Runs 1, 3, 4 and 5 check what a run does on one node, which does not depend on the others, so
they go to gw1 and the controller only: the nodes are alike, and each node adds some 8
CPU-seconds to a play, in a suite that is bound by its CPU.
"""

import dataclasses
import json
import re
import shutil

import pytest
from xcftest import wait_until

from .conftest import RELEASE2_UNIT_MARK
from .walkthrough import set_var

pytestmark = pytest.mark.lab

#: Runs 1, 3, 4 and 5 (see above): gw1 and the controller.
ONE_NODE = ("--limit", "localhost,gw1")

UNIT = "xcflushd"
PROPS = ("ActiveState", "SubState", "Type", "MainPID", "NRestarts", "StatusText", "Result",
         "ActiveEnterTimestampMonotonic", "ActiveExitTimestampMonotonic")


def service(node) -> dict:
    return node.show(UNIT, *PROPS)


def version(node) -> str:
    return node.run(["/opt/xcflushd/bin/xcflushd", "--version"]).stdout.split()[-1]


def ssh_logins(node) -> int:
    """How many SSH logins the node's sshd has accepted since boot."""
    return node.journal("ssh.service", "-b").count("Accepted publickey")


def ok(result) -> str:
    """Assertion message: the run's time, recap and the end of its output."""
    return f"rc={result.returncode} in {result.seconds:.1f}s, log {result.log}\n{result.output[-6000:]}"


#: What a run leaves on a node; a --check run must leave none of it.
NODE_PATHS = ["/opt/xcflushd", "/etc/xcflushd/xcflushd.conf", "/etc/credstore/xcflushd.provider_key",
              "/etc/systemd/system/xcflushd.service", "/var/cache/xcflushd/wheels",
              "/usr/lib/sysusers.d/xcflushd.conf"]


def node_state(node) -> str:
    """Checksums and metadata of everything the role manages on ``node``, and Ansible's
    scratch files: equal before and after a run that changed nothing."""
    script = ('for p in "$@"; do if [ -e "$p" ]; then find "$p" -xdev -printf "%p %s %m %u\\n" | sort;'
              ' find "$p" -xdev -type f -exec sha256sum {} + | sort; else echo "$p absent"; fi; done;'
              ' ls -A /root/.ansible/tmp 2>/dev/null; ls -A /tmp; getent passwd xcflushd || true')
    return node.run(["sh", "-c", script, "state", *NODE_PATHS]).stdout


def test_check_mode_on_fresh_nodes_changes_nothing(fleet, releases):
    before = [node_state(n) for n in fleet.nodes]
    assert all("/opt/xcflushd absent" in b for b in before)
    result = fleet.play("--check", "--diff", *ONE_NODE, release=releases[0])
    assert result.returncode == 0, ok(result)
    assert set(result.recap) == {"localhost", "gw1"}, ok(result)
    assert result.recap["gw1"]["failed"] == 0 and result.recap["gw1"]["changed"] > 0, ok(result)
    assert "+frequency = 5" in result.output, ok(result)  # --diff shows the config file to come ...
    assert "pk-demo" not in result.output  # ... and never the credentials
    assert [node_state(n) for n in fleet.nodes] == before
    assert fleet.staging_left() == []


def test_first_rollout_every_node_active_and_ready(fleet, releases):
    # The walk-through's check and rollout, with its canary ramp added to group_vars/all.yml:
    # two batches, gw1 then the other two.
    check = fleet.walk("check")
    assert check.returncode == 0 and check.output.count("SUCCESS") == 3, ok(check)
    with open(fleet.inventory / "group_vars" / "all.yml", "a") as all_yml:
        all_yml.write(fleet.session.yaml("canary"))
    result = fleet.walk("rollout")
    assert result.returncode == 0, ok(result)
    assert set(result.recap) == {"localhost", *fleet.hosts}, ok(result)
    # Two batches (the ramp was read from the inventory), not three of the default one node.
    assert result.output.count("PLAY [Roll out xcflushd to the gateways]") == 2, ok(result)
    gw1_up = int(service(fleet.nodes[0])["ActiveEnterTimestampMonotonic"])
    assert all(gw1_up < int(service(n)["ActiveEnterTimestampMonotonic"]) for n in fleet.nodes[1:]), \
        "gw2 or gw3 started before the canary gw1 was up"
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in result.recap.values()), ok(result)
    assert "pk-demo" not in result.output  # the provider key never reaches the output
    assert fleet.staging_left() == []  # the controller's staging copy was removed

    for node in fleet.nodes:
        state = service(node)
        # Type=notify: "active" means the daemon sent READY=1 (Redis answered, channel subscribed).
        assert (state["Type"], state["ActiveState"], state["SubState"]) == ("notify", "active", "running"), state
        assert state["NRestarts"] == "0", state
        assert version(node) == releases[0].version
        assert node.systemctl("is-enabled", UNIT).stdout.strip() == "enabled"
        conf = node.run(["cat", "/etc/xcflushd/xcflushd.conf"]).stdout
        assert f"backend = {fleet.sim_url}\n" in conf and "frequency = 5\n" in conf, conf
        assert "pk-demo" not in conf
        cred = node.run(["stat", "-c", "%U:%G %a", "/etc/credstore/xcflushd.provider_key"]).stdout.split()
        assert cred == ["root:root", "600"], cred
        assert node.run(["cat", "/etc/credstore/xcflushd.provider_key"]).stdout == "pk-demo\n"
        # Redis from the redis role: loopback only, a cache's eviction policy, its own unit.
        listening = node.run(["ss", "-Hltn", "sport = :6379"]).stdout.split("\n")
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in listening if line.strip()}
        assert addresses and addresses <= {"127.0.0.1", "[::1]"}, addresses
        policy = node.run(["redis-cli", "config", "get", "maxmemory-policy"]).stdout.split()
        assert policy == ["maxmemory-policy", "volatile-lru"], policy
        assert node.systemctl("show", "redis-server", "-p", "FragmentPath").stdout.strip() == \
            "FragmentPath=/etc/systemd/system/redis-server.service"
    # The nodes talk to the backend (the simulator on the bridge): a flush cycle completes.
    for node in fleet.nodes:
        wait_until(lambda n=node: "last flush" in service(n)["StatusText"], 30, f"a flush on {node.name}")


def test_second_run_changes_nothing(fleet, releases):
    before = service(fleet.nodes[0])["MainPID"]
    result = fleet.play(*ONE_NODE, release=releases[0])
    assert result.returncode == 0, ok(result)
    assert {h: r["changed"] for h, r in result.recap.items()} == {"localhost": 0, "gw1": 0}, ok(result)
    assert service(fleet.nodes[0])["MainPID"] == before  # nothing restarted


def test_check_mode_on_converged_nodes_shows_the_change_and_makes_none(fleet, releases):
    before = [(node_state(n), service(n)["MainPID"]) for n in fleet.nodes]
    result = fleet.play("--check", "--diff", *ONE_NODE, "-e", "xcflushd_frequency=11",
                        "-e", "xcflushd_provider_key=pk-next-secret", release=releases[0])
    assert result.returncode == 0, ok(result)
    assert set(result.recap) == {"localhost", "gw1"} and result.recap["gw1"]["failed"] == 0, ok(result)
    assert "-frequency = 5" in result.output and "+frequency = 11" in result.output, ok(result)
    # A config and credential change: it says the reload would happen, and no restart.
    assert "Reload xcflushd with its new config and credentials" in result.output, ok(result)
    assert "restarting it" not in result.output, ok(result)
    assert "pk-next-secret" not in result.output and "pk-demo" not in result.output
    assert [(node_state(n), service(n)["MainPID"]) for n in fleet.nodes] == before
    assert fleet.staging_left() == []


def test_a_config_change_alone_reloads_the_same_process(fleet, releases):
    gw1 = fleet.nodes[0]
    before = service(gw1)
    result = fleet.play(*ONE_NODE, "-e", "xcflushd_frequency=6", release=releases[0])
    assert result.returncode == 0, ok(result)
    after = service(gw1)
    assert (after["MainPID"], after["NRestarts"]) == (before["MainPID"], before["NRestarts"]), (before, after)
    assert after["ActiveState"] == "active" and running_frequency(gw1) == 6
    assert "reloaded: backend=" in gw1.journal("xcflushd.service", "-n", "50")


def test_config_change_restarts_one_batch_at_a_time(fleet, releases):
    # A setting of the config file and a unit drop-in (verified with the unit, then
    # daemon-reload): one restart per node for both.
    before = [service(n) for n in fleet.nodes]
    result = fleet.play("-e", "xcflushd_frequency=7", "-e", "gateway_batch_size=1",
                        "-e", '{"xcflushd_unit_overrides": "[Service]\\nEnvironment=E2E_DROPIN=1\\n"}',
                        release=releases[0])
    assert result.returncode == 0, ok(result)
    after = [service(n) for n in fleet.nodes]
    for node, old, new in zip(fleet.nodes, before, after):
        assert "frequency = 7\n" in node.run(["cat", "/etc/xcflushd/xcflushd.conf"]).stdout
        assert "E2E_DROPIN=1" in node.show(UNIT, "Environment")["Environment"]
        assert new["MainPID"] != old["MainPID"] and new["ActiveState"] == "active", (old, new)
        assert new["NRestarts"] == old["NRestarts"]  # restarted by the handler, not by a crash
    # Each node went down only after the one before was active again (serial: 1).
    for i in range(len(after) - 1):
        up_again = int(after[i]["ActiveEnterTimestampMonotonic"])
        next_down = int(after[i + 1]["ActiveExitTimestampMonotonic"])
        assert up_again < next_down, (f"gw{i + 2} stopped before gw{i + 1} was back", after)
    assert fleet.staging_left() == []  # removed after the last of the three batches


def test_a_wrong_provider_key_stops_the_rollout_at_the_first_node(fleet, releases):
    # The nodes have nothing to report, so no flush cycle calls the backend: only the gate's
    # check-backend (one read-only authorize) can see the key refused.
    gw1, gw2, gw3 = fleet.nodes
    before = [(service(n)["MainPID"], ssh_logins(n)) for n in (gw2, gw3)]
    result = fleet.play("-e", "xcflushd_provider_key=pk-wrong", release=releases[0])
    assert result.returncode != 0, ok(result)
    assert result.recap["gw1"]["failed"] == 1 and set(result.recap) == {"localhost", "gw1"}, ok(result)
    assert ("gw1: xcflushd is not healthy: the backend refused the provider key (HTTP 403 "
            "provider_key_invalid_or_service_missing") in result.output, ok(result)
    assert "pk-wrong" not in result.output and "pk-demo" not in result.output
    # gw1 was restarted with the wrong key (the run also removed the last test's drop-in) and
    # is READY: Redis answered; its stamp is not recorded, so the next run restarts it again.
    # gw2 and gw3 were never touched.
    assert service(gw1)["ActiveState"] == "active"
    assert gw1.run(["cat", "/etc/credstore/xcflushd.provider_key"]).stdout == "pk-wrong\n"
    assert [(service(n)["MainPID"], ssh_logins(n)) for n in (gw2, gw3)] == before
    assert len(fleet.staging_left()) == 1  # a stopped rollout keeps its staging copy (docs/deployment.md)


def running_frequency(node) -> float:
    """The flush frequency of the daemon running on ``node``, from its own heartbeat."""
    out = node.run(["/opt/xcflushd/bin/xcflushd", "status", "--json"], check=False).stdout
    pid = int(service(node)["MainPID"])
    [mine] = [d for d in json.loads(out)["daemons"] if d["pid"] == pid]
    return float(mine["frequency"])


def test_a_run_that_fails_after_the_config_write_loses_no_restart(fleet, releases):
    # The config file is written, then the drop-in fails its check: the run stops before the
    # restart handler. The rerun finds the config file in place (nothing to change) and must
    # restart anyway, because the running daemon was not started from it (nor from this unit:
    # the last recorded run had a drop-in).
    gw1 = fleet.nodes[0]
    pid = service(gw1)["MainPID"]
    failed = fleet.play("--limit", "gw1", "-e", "xcflushd_frequency=9",
                        "-e", '{"xcflushd_unit_overrides": "[Service]\\nNoSuchSetting=1\\n"}',
                        release=releases[0])
    assert failed.returncode != 0 and failed.recap["gw1"]["failed"] == 1, ok(failed)
    assert "NoSuchSetting" in failed.output, ok(failed)  # systemd-analyze verify refused it
    assert "frequency = 9\n" in gw1.run(["cat", "/etc/xcflushd/xcflushd.conf"]).stdout
    assert service(gw1)["MainPID"] == pid and running_frequency(gw1) != 9  # not restarted
    # This run removed the copy the stopped run before it had left; its own is left.
    assert len(fleet.staging_left()) == 1

    rerun = fleet.play("--limit", "gw1", "-e", "xcflushd_frequency=9", release=releases[0])
    assert rerun.returncode == 0, ok(rerun)
    assert service(gw1)["MainPID"] != pid and service(gw1)["ActiveState"] == "active"
    assert running_frequency(gw1) == 9
    assert fleet.staging_left() == []  # removed after the last batch, though --limit left out localhost


@pytest.mark.parametrize("damage", ["tampered", "unlisted"])
def test_bad_release_stops_before_any_node(fleet, releases, tmp_path, damage):
    bad = tmp_path / "release"
    shutil.copytree(releases[1].dir, bad)
    if damage == "tampered":  # one byte of the wheel changed after signing
        wheel = bad / releases[1].wheel.name
        data = bytearray(wheel.read_bytes())
        data[len(data) // 2] ^= 0xFF
        wheel.write_bytes(bytes(data))
    else:  # a wheel slipped into the release directory that SHA256SUMS does not list
        shutil.copy(releases[1].wheel, bad / "evil-1.0-py3-none-any.whl")
    before = [(service(n)["MainPID"], ssh_logins(n)) for n in fleet.nodes]
    result = fleet.play(release=dataclasses.replace(releases[1], dir=bad))
    assert result.returncode != 0, ok(result)
    assert "Signature verification FAILED" in result.output, ok(result)
    assert set(result.recap) == {"localhost"}, ok(result)  # no gateway host was even reached
    assert result.recap["localhost"]["failed"] == 1
    assert fleet.staging_left() == []  # the rejected copy was removed too
    after = [(service(n)["MainPID"], ssh_logins(n)) for n in fleet.nodes]
    assert after == before  # same processes, and not one SSH login on any node
    assert all(version(n) == releases[0].version for n in fleet.nodes)


def test_bad_variables_stop_before_any_node(fleet, releases):
    # Checked against the role's argument spec on the controller: the daemon would exit 2 at
    # its start (and stay down), so no node may get that far.
    before = [(service(n)["MainPID"], ssh_logins(n)) for n in fleet.nodes]
    for bad, message in [("xcflushd_frequency=5m", "xcflushd_frequency' is of type str"),
                         ("xcflushd_frequency=100", "must be 1 or more, with the frequency at most the auth-ttl")]:
        result = fleet.play("-e", bad, release=releases[0])
        assert result.returncode != 0 and set(result.recap) == {"localhost"}, ok(result)
        assert message in result.output, ok(result)
    assert [(service(n)["MainPID"], ssh_logins(n)) for n in fleet.nodes] == before


@pytest.fixture
def gw1_cannot_start(fleet):
    """gw1's unit gets a drop-in that fails every start; the running daemon is not touched."""
    gw1 = fleet.nodes[0]
    gw1.write("/etc/systemd/system/xcflushd.service.d/99-broken.conf",
              "[Service]\nExecStartPre=/bin/false\n")
    gw1.systemctl("daemon-reload")
    yield gw1
    gw1.run(["rm", "-f", "/etc/systemd/system/xcflushd.service.d/99-broken.conf"])
    gw1.systemctl("daemon-reload")


def test_a_failed_canary_stops_the_rollout(fleet, releases, gw1_cannot_start):
    # Step 6 of the walk-through: release 2 in its own directory, its version pinned in
    # group_vars/all.yml, the same rollout command. The canary gw1 fails; its batch is the
    # first, so gw2 and gw3 are never touched.
    gw1, gw2, gw3 = fleet.nodes
    before = [(service(n), ssh_logins(n)) for n in (gw2, gw3)]
    fleet.place(releases[1])
    set_var(fleet.inventory / "group_vars" / "all.yml", "xcflushd_version",
            f"xcflushd_version: {releases[1].version}")
    result = fleet.walk("rollout")
    assert result.returncode != 0, ok(result)
    assert result.recap["gw1"]["failed"] == 1 and set(result.recap) == {"localhost", "gw1"}, ok(result)
    # gw1: the new release installed, its restart failed.
    assert version(gw1) == releases[1].version and service(gw1)["ActiveState"] != "active"
    for node, (old, logins) in zip((gw2, gw3), before):
        assert version(node) == releases[0].version and ssh_logins(node) == logins
        now = service(node)
        assert (now["MainPID"], now["ActiveState"]) == (old["MainPID"], "active"), (old, now)
    assert len(fleet.staging_left()) == 1


def test_rerun_after_the_fix_resumes_at_the_failed_node(fleet, releases):
    # gw1_cannot_start has been undone. gw1 recorded no release (its service never came up),
    # so this run installs and restarts it again although its files did not change.
    gw1 = fleet.nodes[0]
    result = fleet.walk("resume", {"node": "gw1"})
    assert result.returncode == 0, ok(result)
    assert "Install the release into the virtualenv" in result.output
    assert version(gw1) == releases[1].version
    assert (service(gw1)["ActiveState"], service(gw1)["SubState"]) == ("active", "running")
    # Its unit came from the signed release 2.
    assert RELEASE2_UNIT_MARK in gw1.run(["cat", "/etc/systemd/system/xcflushd.service"]).stdout
    stamp = gw1.run(["cat", "/opt/xcflushd/.xcflushd-release"]).stdout
    assert stamp.startswith(releases[1].wheel.name + " sha256:"), stamp
    assert fleet.staging_left() == []  # and the stopped run's copy is gone


def test_rollback_from_the_installed_collection(fleet, releases, installed_collection):
    # The walk-through's rollback: the previous version pinned again in group_vars/all.yml,
    # run with the collection as ansible-galaxy installs it, from outside the checkout
    # without its ansible.cfg. Only gw1 runs release 2: only gw1 is reinstalled.
    set_var(fleet.inventory / "group_vars" / "all.yml", "xcflushd_version",
            fleet.session.yaml("rollback", {"previous version": releases[0].version}))
    result = fleet.walk("collection", collections=installed_collection)
    assert result.returncode == 0, ok(result)
    for node in fleet.nodes:
        assert version(node) == releases[0].version
        assert (service(node)["ActiveState"], service(node)["SubState"]) == ("active", "running")
    installs = re.findall(r"^TASK \[(?:\S+\.)?xcflushd : Install the release into the virtualenv.*?\n\n", result.output,
                          re.M | re.S)
    reinstalled = set(re.findall(r"^changed: \[(gw\d)\]", "".join(installs), re.M))
    assert reinstalled == {"gw1"}, ok(result)
    # The unit is rolled back with the wheel: it comes from the signed release.
    assert all(RELEASE2_UNIT_MARK not in n.run(["cat", "/etc/systemd/system/xcflushd.service"]).stdout
               for n in fleet.nodes)
    assert fleet.staging_left() == []
