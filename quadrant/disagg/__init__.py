"""Prefill/decode disaggregation: the KV transfer between engines, the router in front of them, the launcher."""
