"""Driver state kept in the run directory for reload, re-exec and crash recovery."""
