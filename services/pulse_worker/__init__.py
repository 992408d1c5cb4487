"""pulse-worker: runs the health checks of its shard of backends and reports to the writer."""
