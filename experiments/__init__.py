"""Experiments: configs, benchmark and reproduction scripts (never imported by the library)."""
