"""What crosses the process boundary, torch-free: the request, the events, the errors (the launcher imports these)."""
