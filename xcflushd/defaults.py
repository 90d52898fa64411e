"""Defaults and fixed names. Durations are in seconds unless the name says otherwise."""

REDIS_PORT = 6379
BACKEND_URL = "https://su1.3scale.net"
CONFIG_FILE = "/etc/xcflushd/xcflushd.conf"

AUTH_TTL = 900                  # lifetime of a cached authorization written by the daemon
FREQUENCY = 300                 # seconds between the starts of two flush cycles
REPORT_AUTH_WAIT = 5            # reports are applied asynchronously by the backend
REPORT_BATCH_SIZE = 1000        # backend documents 1000 transactions per report call
REPORT_BATCH_MAX_PARAMS = 4000  # current backend rejects bodies over 4096 form parameters
THREADS = 32                    # flush-cycle backend calls in flight at once
# Priority authorizations in flight at once (one engine multiplexes them): a cold-cache storm of
# 5000 distinct requests at 30 ms is answered well inside the gateway's 3 s; more would only load
# the backend harder.
PRIO_THREADS = 128
# A daemon's claim on a priority request lapses after this if it dies holding it; the gateway
# has given up by then (it waits 3 s). A slower call may end up made twice, never unanswered.
CLAIM_TTL_MS = 3000
PRIO_QUEUE = 10000              # priority requests waiting for a slot; beyond: dropped, logged, counted
BACKEND_CONNECT_TIMEOUT = 5
BACKEND_READ_TIMEOUT = 10
OUTAGE_MODES = ("strict", "resilient", "allow")  # --backend-outage; the first is the default
# How long after the backend last answered cached authorizations are kept alive through an outage
# (--backend-outage resilient or allow): four default auth TTLs. A revoked key or a suspended
# application takes effect at most this late; past it, the gateway denies what is not cached.
MAX_STALE = 3600
# Lifetime of a "1" answered without the backend (--backend-outage allow), or the auth TTL if shorter:
# the gateway asks again soon, so the backend's own answer replaces it soon after it is back.
ALLOW_TTL = 60
MAX_TERM_WAIT = 30              # graceful stop budget after SIGTERM
METRICS_LISTEN = "127.0.0.1:9422"  # /metrics; 9421 is APIcast's on the same node
BACKLOG_INTERVAL = 30           # seconds between counts of what waits in Redis, for the metrics

REDIS_CHUNK = 1000              # keys per pipelined Redis round trip
LEASE_TTL = 60                  # a cycle's claim on its hand-over keys; renewed while it works
LEASE_RENEW_INTERVAL = 5        # how often a working cycle renews it
RECOVERY_INTERVAL = 30          # how often to SCAN for keys left behind by a dead cycle
DEAD_LETTER_AFTER = 3           # cycles a hopeless report is retried before it is set aside
# One retry policy for every Redis command (storage.connect): a lost connection or a timeout is
# retried with exponential backoff and equal jitter (REDIS_RETRY_BASE doubling up to
# REDIS_RETRY_CAP), for at most REDIS_RETRY_BUDGET seconds per command. A Redis restart of a
# few seconds then fails no command; a longer outage fails the command after the budget.
REDIS_RETRY_BASE = 0.02
REDIS_RETRY_CAP = 1.0
REDIS_RETRY_BUDGET = 10.0
MAX_RESPONSE_BYTES = 1 << 20    # a status document is a few KB; anything huge is garbage

# Redis names fixed by the gateway (apicast-xc); see shared protocol, section 7.
REPORT_KEYS_SET = "report_keys"
FLUSHING_PREFIX = "flushing_report_keys"
TO_FLUSH_PREFIX = "to_flush:"
AUTH_REQUESTS_CHANNEL = "xc_channel_auth_requests"
AUTH_RESPONSES_CHANNEL_PREFIX = "xc_channel_auth_response:"

# Redis names of our own.
DEAD_LETTER_HASH = "xcflushd:dead_letter"
FAILURES_HASH = "xcflushd:report_failures"
LEASE_PREFIX = "xcflushd:lease:"
HEARTBEAT_PREFIX = "xcflushd:daemon:"   # + a daemon's id: its heartbeat record (heartbeat.py)
QUARANTINE_PREFIX = "xcflushd:quarantine:"
CLAIM_PREFIX = "xcflushd:claim:"           # + a priority request message: the daemon answering it
