"""Node executors: the built-in node types that run outside the decide step."""
