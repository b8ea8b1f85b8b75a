"""GraphQL gateway (issue 5)."""
