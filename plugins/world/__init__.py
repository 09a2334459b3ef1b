"""The procedural shapes world: prompts, rendering, parsing (no downloads)."""
