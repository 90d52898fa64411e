"""xcflushd: flushes the 3scale XC gateway's Redis cache to the 3scale backend.

The gateway (apicast-xc) caches authorizations and usage reports in Redis;
this daemon reports the usage to 3scale's Service Management API, renews the
cached authorizations, and answers the gateway's priority authorization
requests over Redis pub/sub.
"""

__version__ = "2.0.0.dev0"

__all__ = ["__version__"]
