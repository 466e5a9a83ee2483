"""Measurement helpers and benchmark drivers behind ``convrec bench``."""
