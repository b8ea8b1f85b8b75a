"""ClickHouse projections (issue 4)."""
