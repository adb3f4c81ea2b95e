"""Data: BBC News and users' files as labelled texts, train/test splits, client partitions, tokenising."""
