"""Workflow definition language, commands, events and node contracts: pydantic models, no I/O."""
