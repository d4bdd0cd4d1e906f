"""Where answers live: the output folder's layout and resume (layout), shard commits (commit), the answers reader (answers)."""
