"""Arrow replay store: episodes as rows, sharded by task and outcome."""
