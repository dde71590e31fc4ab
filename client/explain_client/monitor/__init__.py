"""``explain-monitor``: explain a sample of traffic through a running service, one summary row
per record in Parquet, and report drift between two such tables (docs/monitoring.md)."""
