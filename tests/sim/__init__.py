"""Tests of the 3scale backend simulator (xcflushd_sim)."""
