"""Built-in plugins, each registered through the `mixgrpo` entry-point group."""
