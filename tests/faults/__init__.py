"""Fault-injection tests: private brokers restarted, connections killed, replicas killed under load."""
