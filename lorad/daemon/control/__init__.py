"""The control plane: JSON lines over a Unix socket (protocol v1), its server and its client."""
