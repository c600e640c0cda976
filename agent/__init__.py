"""gradwatch agent: in-process statistics and the background sender."""
