"""Probes: read a concept at a site, find where it lives, monitor it, steer with it, erase it."""
