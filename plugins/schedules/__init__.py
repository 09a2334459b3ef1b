"""Built-in schedules plugins."""
