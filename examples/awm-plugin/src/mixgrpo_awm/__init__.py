"""AWM as a third-party mixgrpo plugin (see plugin.py)."""
