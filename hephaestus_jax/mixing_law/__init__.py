"""The mixing law of an agent-share sweep: its runs (study), the fitted transfer power laws (fit), the report."""
