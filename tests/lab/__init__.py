"""Reusable test lab: real systemd nodes booted with systemd-nspawn (see nspawn.py)."""
