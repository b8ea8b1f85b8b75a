"""Event-sourced aggregates (Workflow, Run) and the event-store application."""
