"""Reports: results files of a run and their human-readable summaries."""
