"""Build-time tooling that assembles the offline default corpus (see build.py)."""
