"""Fixtures for the backend simulator's tests: a started simulator and an HTTP session."""

import pytest
import requests

from xcflushd_sim.server import Simulator

from .helpers import NOW, spec_config


@pytest.fixture
def sim():
    simulator = Simulator(spec_config(), clock=lambda: NOW).start()
    try:
        yield simulator
    finally:
        simulator.stop()


@pytest.fixture
def http():
    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy from the environment
    try:
        yield session
    finally:
        session.close()
