"""A 3scale Service Management API simulator for tests, benchmarks and offline staging."""
