"""Deployment: the state table (pure), its store, staging, probation, the fetch worker and its client."""
