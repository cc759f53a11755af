"""Brokers: how instances share presence, routing and queues (``base.Broker``; memory and Redis)."""
