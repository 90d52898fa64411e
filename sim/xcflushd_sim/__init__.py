"""A 3scale Service Management API simulator for tests, benchmarks and offline staging.

Start one with ``Simulator(config).start()`` (:mod:`.server`) or the ``xcflushd-backend-sim``
command (:mod:`.cli`); assert on ``sim.backend`` (:mod:`.model`). Modules, one job each:

* :mod:`.model` — backend state and semantics (authorize, report, ledgers); config format
* :mod:`.config` — config validation and :func:`~.config.demo_config`
* :mod:`.params` — Rack nested-parameter parsing and extension flags
* :mod:`.periods` — limit periods, boundaries, report timestamps
* :mod:`.errors` — error codes, statuses and messages; denial reasons
* :mod:`.xmldoc` — the XML documents, byte for byte
* :mod:`.faults` — fault injection config and payloads
* :mod:`.server` — HTTP endpoints, fault execution, control endpoints, ``Simulator``
* :mod:`.cli` — the command line

Nothing is imported here, so importing a sibling module stays cheap.
"""
