"""The live router's mechanism: a gRPC (and OpenAI HTTP) server that relays requests to replica
servers (server.py; its gRPC services in services.py), its links to them with health checks and
failover (links.py), its HTTP front (http.py) and its settings (config.py). Which replica a
request goes to is a routing policy's (jinfer.routing.Router; scheduler/routing/policies.py)."""
