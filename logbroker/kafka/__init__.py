"""Kafka's wire protocol, a second front end beside gRPC: unchanged Kafka clients and tools talk to logbroker.

framing.py reads and writes frames and request headers; versions.py holds the table of served APIs and
versions; errors.py maps the broker's and the coordinator's errors to Kafka's codes; server.py runs the
listener (one task per connection, requests answered in order); handlers/ turns each API's requests into
calls of the protocol-neutral broker core (logbroker.server.broker, logbroker.server.groups).
Message classes come from kio (generated from Kafka's message specs); record batches pass through as bytes.
"""
