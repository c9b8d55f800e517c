"""Child-process entry points for python and SQL jobs (no Django in the child)."""
