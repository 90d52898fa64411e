"""Static checks of ansible/: ansible-lint (production profile, offline), the playbook's
syntax, and role READMEs that document every default variable."""

import re
import subprocess

import pytest
import yaml

from .conftest import ANSIBLE_DIR, ansible_env, tool

ROLES = sorted(p.name for p in (ANSIBLE_DIR / "roles").iterdir() if p.is_dir())


def run(cmd, tmp_path):
    return subprocess.run(cmd, cwd=ANSIBLE_DIR, env=ansible_env(tmp_path / "home"),
                          capture_output=True, text=True, timeout=300)


def test_ansible_lint_production_profile(tmp_path):
    proc = run([tool("ansible-lint"), "--offline", "--profile", "production", "--strict"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Profile 'production' was required, and it passed" in proc.stdout + proc.stderr


def test_playbook_syntax(tmp_path):
    proc = run([tool("ansible-playbook"), "--syntax-check", "-i", "inventory/hosts.yml", "site.yml"],
               tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_example_inventory_has_the_gateways_group(tmp_path):
    proc = run([tool("ansible-inventory"), "-i", "inventory/hosts.yml", "--graph", "gateways"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "@gateways:" in proc.stdout and "gw1.example.com" in proc.stdout


@pytest.mark.parametrize("role", ROLES)
def test_role_readme_documents_every_default(role):
    defaults = yaml.safe_load((ANSIBLE_DIR / "roles" / role / "defaults" / "main.yml").read_text())
    readme = (ANSIBLE_DIR / "roles" / role / "README.md").read_text()
    documented = set(re.findall(r"^#+ *`(\w+)`|^\| *`(\w+)`", readme, re.M))
    names = {a or b for a, b in documented}
    assert sorted(set(defaults) - names) == [], f"{role}/README.md misses these variables"
    assert sorted(names - set(defaults) - {"gateway_manage_redis", "gateway_batch_size"}) == []
