"""Sources -> token shards; objective batchers."""
