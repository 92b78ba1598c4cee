"""What server and site share: wire keys, the job spec, SecAgg crypto/encoding/protocol
messages, privacy accounting, the update layout and partial-sharing key rules.

Both sides import this package; it imports neither of them, and nothing here may import
``flwr.serverapp`` (a site process never needs the server's half of Flower).
"""
