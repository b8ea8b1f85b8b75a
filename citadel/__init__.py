"""Composition root: settings, the citadel CLI, and the wiring of the parts."""
