"""VM drivers."""
