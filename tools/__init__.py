"""The `roam` command-line front end: the only layer that prints, parses argv or reads the clock."""
