"""Stall app: one slow-to-fetch message, then the ServerApp waits to be stopped (tests/test_zygote_stop_race.py)."""
