"""Subscription bootstrap, receiver logic, jobs, worker pipeline and reconciliation."""
