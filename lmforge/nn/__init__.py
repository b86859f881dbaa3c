"""Building blocks with no knowledge of model families."""
